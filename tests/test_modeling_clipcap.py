"""ClipCapForCaptioning / ClipCapConfig / ClipCapProcessor on tiny random models."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, LogitsProcessor, LogitsProcessorList

from modeling_clipcap import ClipCapConfig, ClipCapForCaptioning, caption_stop_token_ids
from tests import tiny


@pytest.fixture(scope="module")
def batch(tiny_clipcap):
    _, processor = tiny_clipcap
    images = tiny.random_images(3, seed=1)
    return processor(images=images, text=["a red circle.", "two blue squares on the left.", "a star"])


def manual_caption_loss(model, pixel_values, input_ids, attention_mask):
    """Cross-entropy over caption tokens only, computed by hand from the full logits."""
    logits = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
    p = model.config.prefix_length
    pred = logits[:, p - 1 : -1]  # position p-1+t predicts caption token t
    nll = torch.nn.functional.cross_entropy(pred.transpose(1, 2), input_ids, reduction="none")
    mask = attention_mask.bool()
    return nll[mask].mean()


def test_config_defaults_are_the_papers():
    config = ClipCapConfig()
    assert config.prefix_length == 10 and config.mapping_type == "mlp"
    assert config.clip_embed_dim == 512 and config.mapper_hidden_size == 3840  # 512 -> 3840 -> 7680
    assert config.vision_config.patch_size == 32 and config.text_config.n_embd == 768
    assert config.freeze_vision
    with pytest.raises(ValueError, match="mapping_type"):
        ClipCapConfig(mapping_type="lstm")


def test_paper_mapper_shapes(tokenizer):
    model = ClipCapForCaptioning(ClipCapConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        text_config=dict(n_layer=1, vocab_size=len(tokenizer))))
    shapes = [tuple(p.shape) for p in model.mapper.parameters()]
    assert shapes == [(3840, 512), (3840,), (7680, 3840), (7680,)]


def test_loss_counts_caption_tokens_only(tiny_clipcap, batch):
    model, _ = tiny_clipcap
    out = model(**batch)
    expected = manual_caption_loss(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(out.loss, expected)
    # Padding ids do not matter: replace every padded position with an arbitrary token.
    padded = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 42)
    again = model(pixel_values=batch["pixel_values"], input_ids=padded,
                  attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(again.loss, out.loss)
    # More padding does not change the loss either.
    extra = {k: torch.cat([v, v.new_full((3, 4), -100 if k == "labels" else 0)], 1)
             for k, v in batch.items() if k != "pixel_values"}
    longer = model(pixel_values=batch["pixel_values"], **extra)
    torch.testing.assert_close(longer.loss, out.loss)
    assert out.logits.shape[1] == model.config.prefix_length + batch["input_ids"].shape[1]


def test_processor_masks_padding_not_eos(tiny_clipcap, tokenizer):
    _, processor = tiny_clipcap
    enc = processor(text=["a star", "two blue squares on the left."])
    eos = tokenizer.eos_token_id
    first = enc["input_ids"][0].tolist()
    n = int(enc["attention_mask"][0].sum())
    assert first[n - 1] == eos  # the appended eos is a real, supervised token ...
    assert enc["labels"][0, n - 1] == eos
    assert (enc["labels"][0, n:] == -100).all()  # ... while padding (same id) is masked
    assert (enc["labels"][1] != -100).all()


def test_image_embeds_path_equals_pixel_path(tiny_clipcap, batch):
    model, _ = tiny_clipcap
    embeds = model.get_image_embeds(batch["pixel_values"])
    assert embeds.shape == (3, model.config.clip_embed_dim)
    a = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).logits
    b = model(image_embeds=embeds, input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(a, b)
    assert model.get_prefix(image_embeds=embeds).shape == (3, model.config.prefix_length, 32)
    with pytest.raises(ValueError, match="exactly one"):
        model.get_prefix()


def greedy_without_cache(model, pixel_values, steps):
    """Reference greedy decoding: recompute prefix + caption every step, no KV cache."""
    prefix = model.get_prefix(pixel_values=pixel_values)
    ids = torch.empty(prefix.shape[0], 0, dtype=torch.long)
    for _ in range(steps):
        embeds = torch.cat([prefix, model.get_input_embeddings()(ids)], 1)
        logits = model(inputs_embeds=embeds).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


def test_greedy_generate_matches_reference_loop(tokenizer):
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=3, stop_token_ids=[])
    model.generation_config.eos_token_id = None  # no early stop: compare 12 full steps
    pixel_values = processor(images=tiny.random_images(4, seed=2))["pixel_values"]
    out = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=12)
    assert out.shape == (4, 12)  # only caption tokens come back
    torch.testing.assert_close(out, greedy_without_cache(model, pixel_values, 12))


def test_logits_bias_enters_decoding(tokenizer):
    model, processor = tiny.build_tiny_clipcap(tokenizer, lm_head_bias=True)
    target = tokenizer.convert_tokens_to_ids("Ġcircle")
    with torch.no_grad():
        model.logits_bias[target] = 1e4
    pixel_values = processor(images=tiny.random_images(2))["pixel_values"]
    out = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=3)
    assert (out == target).all()


def sequence_logprob(model, pixel_values, ids, pad_id, stop_ids):
    """Sum of log-probs of each caption's tokens up to and including its first stop token."""
    logits = model(pixel_values=pixel_values, input_ids=ids).logits[:, model.config.prefix_length - 1 : -1]
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    scores, lengths = [], []
    for row, lp in zip(ids.tolist(), logp):
        n = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        scores.append(lp[:n].sum())
        lengths.append(n)
    return torch.stack(scores), torch.tensor(lengths)


def test_beam_search_scores_are_the_models(tiny_clipcap, tokenizer):
    model, processor = tiny_clipcap
    pixel_values = processor(images=tiny.random_images(2, seed=5))["pixel_values"]
    out = model.generate(pixel_values=pixel_values, num_beams=5, num_return_sequences=5, max_new_tokens=6,
                         return_dict_in_generate=True, output_scores=True, length_penalty=0.0)
    seqs = out.sequences
    assert seqs.shape[0] == 10
    stop = set(model.generation_config.eos_token_id)
    logp, _ = sequence_logprob(model, pixel_values.repeat_interleave(5, 0), seqs, tokenizer.pad_token_id, stop)
    torch.testing.assert_close(out.sequences_scores, logp, atol=1e-4, rtol=1e-4)
    for image in range(2):
        scores = out.sequences_scores[image * 5 : image * 5 + 5]
        assert (scores[:-1] >= scores[1:] - 1e-6).all()  # best first
        assert len({tuple(s) for s in seqs[image * 5 : image * 5 + 5].tolist()}) == 5
    # the best beam is at least as likely as the greedy caption (length_penalty=0: raw log-prob)
    greedy = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=6)
    greedy_logp, _ = sequence_logprob(model, pixel_values, greedy, tokenizer.pad_token_id, stop)
    assert (out.sequences_scores[::5] >= greedy_logp - 1e-4).all()


def test_sampling_follows_tempered_distribution(tiny_clipcap):
    model, processor = tiny_clipcap
    pixel_values = processor(images=tiny.random_images(1, seed=7))["pixel_values"]
    temperature = 2.0
    with torch.no_grad():
        first = model(pixel_values=pixel_values).logits[0, -1]
    probs = torch.softmax(first / temperature, -1)
    torch.manual_seed(0)
    n = 4000
    out = model.generate(pixel_values=pixel_values, do_sample=True, num_beams=1, temperature=temperature,
                         top_k=0, max_new_tokens=1, num_return_sequences=n)
    counts = torch.bincount(out[:, 0], minlength=probs.numel()).float() / n
    top = probs.topk(5).indices
    assert torch.allclose(counts[top], probs[top], atol=4 * (probs[top] * (1 - probs[top]) / n).sqrt().max() + 1e-3)


class ForceTokens(LogitsProcessor):
    """Force row r to emit sequences[r][t] at step t (then keep emitting its last token)."""

    def __init__(self, sequences):
        self.sequences = sequences

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1]
        forced = torch.full_like(scores, -float("inf"))
        for r, seq in enumerate(self.sequences):
            forced[r, seq[min(step, len(seq) - 1)]] = 0.0
        return forced


def test_generation_stops_after_first_token_containing_a_period(tiny_clipcap, tokenizer):
    model, processor = tiny_clipcap
    stop_ids = caption_stop_token_ids(tokenizer)
    assert stop_ids and all("." in tokenizer.convert_ids_to_tokens(i) for i in stop_ids)
    assert set(stop_ids) <= set(model.generation_config.eos_token_id)
    texts = ["a red circle. two blue squares", "two blue squares on the left... a star", "a star on the right"]
    seqs = [tokenizer(t).input_ids for t in texts]
    pixel_values = processor(images=tiny.random_images(3))["pixel_values"]
    out = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=12,
                         logits_processor=LogitsProcessorList([ForceTokens(seqs)]))
    captions = processor.batch_decode(out)
    assert captions[0] == "a red circle."
    assert captions[1] == "two blue squares on the left..."
    assert captions[2].startswith("a star on the right")  # no period: runs to max_new_tokens
    pad = tokenizer.pad_token_id
    n0 = len(tokenizer("a red circle.").input_ids)
    assert (out[0, n0:] == pad).all() and out.shape[1] == 12


def test_transformer_mapper_generates(tokenizer):
    model, processor = tiny.build_tiny_clipcap(tokenizer, mapping_type="transformer")
    pixel_values = processor(images=tiny.random_images(2))["pixel_values"]
    assert model.get_prefix(pixel_values=pixel_values).shape == (2, 4, 32)
    assert model.generate(pixel_values=pixel_values, max_new_tokens=5).shape[0] == 2


def test_vision_tower_frozen_unless_asked(tokenizer):
    frozen, _ = tiny.build_tiny_clipcap(tokenizer)
    assert not any(p.requires_grad for p in frozen.vision_model.parameters())
    assert all(p.requires_grad for p in frozen.mapper.parameters())
    assert all(p.requires_grad for p in frozen.language_model.parameters())
    trainable, _ = tiny.build_tiny_clipcap(tokenizer, freeze_vision=False)
    assert all(p.requires_grad for p in trainable.vision_model.parameters())


@pytest.mark.parametrize("mode", ["RGBA", "LA", "CMYK", "L", "P", "I;16", "1", "F"])
def test_processor_handles_odd_images(tiny_clipcap, mode):
    _, processor = tiny_clipcap
    image = Image.new(mode, (7, 5))
    out = processor(images=[image, Image.new("RGB", (1, 1)), Image.new("RGB", (300, 2))])
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    assert torch.isfinite(out["pixel_values"]).all()


def test_transparent_pixels_become_white(tiny_clipcap):
    _, processor = tiny_clipcap
    clear = processor(images=Image.new("RGBA", (40, 40), (255, 0, 0, 0)))["pixel_values"]
    white = processor(images=Image.new("RGB", (40, 40), (255, 255, 255)))["pixel_values"]
    torch.testing.assert_close(clear, white)


def test_auto_classes_in_repo_without_remote_code(tiny_clipcap_dir, batch, tokenizer):
    model = AutoModel.from_pretrained(tiny_clipcap_dir)
    processor = AutoProcessor.from_pretrained(tiny_clipcap_dir)
    assert isinstance(model, ClipCapForCaptioning)
    reference, _ = tiny.build_tiny_clipcap(tokenizer)
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
    assert processor(text="a star")["input_ids"].tolist() == [tokenizer("a star").input_ids + [tokenizer.eos_token_id]]
    config = json.loads((tiny_clipcap_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_clipcap.ClipCapForCaptioning"
    generation = json.loads((tiny_clipcap_dir / "generation_config.json").read_text())
    assert generation["num_beams"] == 5 and generation["max_new_tokens"] == 40


FRESH_PROCESS = """
import json, sys, torch
from transformers import AutoModel, AutoProcessor
folder, pixels = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert "modeling_clipcap" not in sys.modules, "the repo package must not be importable here"
pixel_values = torch.load(pixels, weights_only=True)
from transformers import pipeline
from PIL import Image
captioner = pipeline("image-to-text", model=folder, trust_remote_code=True)
images = [Image.open(p) for p in sys.argv[3:]]
print(json.dumps({"captions": processor.batch_decode(model.generate(pixel_values=pixel_values, max_new_tokens=12)),
                  "pipeline": [out[0]["generated_text"] for out in captioner(images, max_new_tokens=12)],
                  "module": type(model).__module__}))
"""


def test_fresh_process_remote_code_gives_identical_captions(tiny_clipcap_dir, tmp_path, tokenizer):
    model, processor = tiny.build_tiny_clipcap(tokenizer)
    images = tiny.random_images(3, seed=11)
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    for image, path in zip(images, paths):
        image.save(path)
    pixel_values = processor(images=images)["pixel_values"]
    expected = processor.batch_decode(model.generate(pixel_values=pixel_values, max_new_tokens=12))
    torch.save(pixel_values, tmp_path / "pixels.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tiny_clipcap_dir), str(tmp_path / "pixels.pt"),
                          *paths], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.")
    assert result["captions"] == expected
    assert result["pipeline"] == expected  # pipeline("image-to-text") gives generate's captions
    # without trust_remote_code, loading is refused
    refuse = FRESH_PROCESS.replace(", trust_remote_code=True", "")
    run = subprocess.run([sys.executable, "-c", refuse, str(tiny_clipcap_dir), str(tmp_path / "pixels.pt"), *paths],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0


# -- the authors' release ranking ("with_prefix", transformers 4.29) ----------------------------------


def test_end_after_stop_token_processor_forces_end_of_text():
    from modeling_clipcap.modeling_clipcap import EndAfterStopTokenLogitsProcessor

    processor = EndAfterStopTokenLogitsProcessor([3, 5], eos_token_id=0)
    scores = torch.randn(3, 8)
    assert torch.equal(processor(torch.empty(3, 0, dtype=torch.long), scores.clone()), scores)  # first step
    out = processor(torch.tensor([[1, 3], [5, 2], [4, 5]]), scores.clone())
    low = torch.finfo(scores.dtype).min
    for row in (0, 2):  # last token is a stop token: end-of-text at log-prob 0, nothing else
        assert out[row, 0] == 0 and (out[row, 1:] == low).all()
    assert torch.equal(out[1], scores[1])


def test_with_prefix_scores_count_the_prefix_positions(tokenizer):
    """Finished beams are ranked by sum log-prob / (prefix_length + caption tokens kept), the stop
    token counted and the end-of-text it forces not (transformers 4.29's BeamHypotheses.add)."""
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=2, lm_head_bias=True)
    stop_ids = set(model.config.stop_token_ids)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # captions that differ between images and end at mixed lengths
        for name, param in model.named_parameters():
            param.add_(torch.randn(param.shape, generator=g) * (1.0 if name.startswith("mapper") else 0.3))
        model.logits_bias.zero_()
        model.logits_bias[list(stop_ids)] = 1.0
    pixel_values = processor(images=tiny.random_images(3, seed=4))["pixel_values"]
    out = model.generate(pixel_values=pixel_values, length_normalization="with_prefix", num_return_sequences=5,
                         max_new_tokens=8, return_dict_in_generate=True, output_scores=True)
    eos, p = tokenizer.eos_token_id, model.config.prefix_length
    seqs = out.sequences
    logits = model(pixel_values=pixel_values.repeat_interleave(5, 0), input_ids=seqs).logits[:, p - 1 : -1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    expected, ended = [], 0
    for row, lp in zip(seqs.tolist(), logp):
        kept = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        ended += kept < len(row)
        if kept < len(row):
            assert row[kept] == eos  # end-of-text forced after the stop token
        expected.append(lp[:kept].sum() / (p + kept))
    assert 0 < ended < len(seqs)
    torch.testing.assert_close(out.sequences_scores.float(), torch.stack(expected), atol=1e-4, rtol=1e-4)
    # the default ("generated") divides by the caption tokens only: other scores
    plain = model.generate(pixel_values=pixel_values, num_return_sequences=5, max_new_tokens=8,
                           return_dict_in_generate=True, output_scores=True)
    assert not torch.allclose(plain.sequences_scores.float(), out.sequences_scores.float())


def test_with_prefix_greedy_captions_equal_the_default(tiny_clipcap):
    model, processor = tiny_clipcap
    pixel_values = processor(images=tiny.random_images(4, seed=9))["pixel_values"]
    a = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=10)
    b = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=10, length_normalization="with_prefix")
    assert processor.batch_decode(a) == processor.batch_decode(b)


def test_length_normalization_is_validated(tiny_clipcap, tokenizer):
    assert ClipCapConfig().length_normalization == "generated"  # this repository's models keep today's ranking
    with pytest.raises(ValueError, match="length_normalization"):
        tiny.tiny_clipcap_config(tokenizer, length_normalization="prefix")
    model, processor = tiny_clipcap
    with pytest.raises(ValueError, match="length_normalization"):
        model.generate(pixel_values=processor(images=tiny.random_images(1))["pixel_values"], length_normalization="x")
