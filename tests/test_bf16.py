"""bf16 where the hardware has it: the judge, SR training (sampling and log-prob pass in autocast,
float32 log-softmax and loss), MLE training, and the chunked log-prob pass (same gradient)."""

import math

import pytest
import torch

from metrics.clip_judge import ClipJudge, bf16_available, resolve_dtype
from tests import tiny
from trainers import SRTrainer


config = tiny.sr_config


def test_resolve_dtype():
    assert resolve_dtype(None) == resolve_dtype("float32") == resolve_dtype("fp32") == torch.float32
    assert resolve_dtype("bf16") == resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if bf16_available("cpu") else torch.float32)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("half-ish")


def test_bf16_judge_embeddings_are_close_to_float32(tiny_clip_judge_dir):
    images = tiny.random_images(6, size=32, seed=2)
    texts = ["a red circle on the left.", "two blue squares", "a star", "", "a green star at the top", "a cat"]
    fp32 = ClipJudge.from_pretrained(str(tiny_clip_judge_dir))
    bf16 = ClipJudge.from_pretrained(str(tiny_clip_judge_dir), dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16 and bf16.cache_key != fp32.cache_key
    for a, b in ((fp32.embed_texts(texts), bf16.embed_texts(texts)), (fp32.embed_images(images), bf16.embed_images(images))):
        assert b.dtype == torch.float32  # embeddings always float32
        assert (a * b).sum(1).min() > 0.99  # cosine between the fp32 and bf16 embedding of each input


def trained_probability(tmp_path, tokenizer, data, bf16: bool, chunk=25):
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=1)
    target = tokenizer.convert_tokens_to_ids("Ġcircle")

    def likes_circle(completions, completion_ids, **kw):
        return [float(target in ids) for ids in completion_ids]

    def probability():
        with torch.no_grad():
            pixel_values = processor(images=list(data["image"]))["pixel_values"]
            return torch.softmax(model(pixel_values=pixel_values).logits[:, -1], -1)[:, target].mean().item()

    before = probability()
    args = config(tmp_path, max_steps=12, learning_rate=3e-3, temperature=1.0, baseline="rloo", num_generations=4,
                  max_new_tokens=4, bf16=bf16, logprob_chunk_size=chunk)
    trainer = SRTrainer(model, likes_circle, args=args, train_dataset=data, processing_class=processor)
    trainer.train()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    return before, probability(), trainer


def test_sr_training_in_bf16_learns_like_float32(tmp_path, tokenizer):
    data = tiny.caption_dataset(12)
    before, after, trainer = trained_probability(tmp_path / "bf16", tokenizer, data, bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert after > 1.2 * before, (before, after)  # the rewarded token became more likely
    _, after_fp32, _ = trained_probability(tmp_path / "fp32", tokenizer, data, bf16=False)
    assert after_fp32 > 1.2 * before
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses)


def test_chunked_log_prob_pass_gives_the_same_gradient(tmp_path, tokenizer):
    data = tiny.caption_dataset(12)
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=3)
    trainer = SRTrainer(model, lambda completions, completion_ids, **kw: [float(len(c)) for c in completion_ids],
                        args=config(tmp_path), train_dataset=data, processing_class=processor)
    trainer.baseline.update(4.0)  # non-zero advantages
    batch = trainer.data_collator([dict(data[i], bag_id=0) for i in range(6)])
    prepared = trainer._prepare_inputs(batch)
    trainer._prepare_inputs = lambda inputs: prepared  # the same sampled captions for every chunk size
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    grads, losses = [], []
    for chunk in (None, 2, 5):
        trainer.args.logprob_chunk_size = chunk
        model.zero_grad(set_to_none=True)
        losses.append(trainer.training_step(model, batch).item())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and all(g.keys() == grads[0].keys() for g in grads)
    assert any(v.abs().max() > 0 for v in grads[0].values())
    for other in grads[1:]:
        for name, value in grads[0].items():
            torch.testing.assert_close(other[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_mle_training_in_bf16_lowers_the_loss(tmp_path, tiny_clipcap_dir):
    import datasets

    import train_mle

    folder = tmp_path / "coco"
    datasets.DatasetDict({"train": tiny.caption_dataset(24)}).save_to_disk(folder)
    out = tmp_path / "mle"
    train_mle.main(["--dataset", str(folder), "--model", str(tiny_clipcap_dir), "--output_dir", str(out),
                    "--max_steps", "30", "--learning_rate", "5e-3", "--warmup_steps", "0", "--bf16",
                    "--per_device_train_batch_size", "16", "--report_to", "none", "--save_strategy", "no",
                    "--use_cpu", "--logging_steps", "5"])
    import json

    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses


def test_bf16_captioner_is_close_to_float32_and_inference_loads_it(tmp_path, tiny_clipcap_dir):
    import inference
    from modeling_clipcap import ClipCapForCaptioning

    model32, processor = inference.load_captioner(str(tiny_clipcap_dir), torch.device("cpu"), "float32")
    model16, _ = inference.load_captioner(str(tiny_clipcap_dir), torch.device("cpu"), "bfloat16")
    auto, _ = inference.load_captioner(str(tiny_clipcap_dir), torch.device("cpu"), "auto")
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    assert next(auto.parameters()).dtype == (torch.bfloat16 if bf16_available("cpu") else torch.float32)
    reference = ClipCapForCaptioning.from_pretrained(tiny_clipcap_dir).eval()  # today's float32 path
    pixel_values = processor(images=tiny.random_images(8, seed=4))["pixel_values"]
    assert torch.equal(model32.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=6),
                       reference.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=6))
    ids = torch.randint(0, 300, (8, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p32 = torch.softmax(model32(pixel_values=pixel_values, input_ids=ids).logits.float(), -1)
        p16 = torch.softmax(model16(pixel_values=pixel_values, input_ids=ids).logits.float(), -1)
    assert (p32 - p16).abs().max() < 0.02  # next-token probabilities within 2 points


def test_static_cache_decodes_like_the_dynamic_cache(tiny_clipcap):
    import inference

    model, processor = tiny_clipcap
    pixel_values = processor(images=tiny.random_images(4, seed=9))["pixel_values"]
    kwargs = inference.compiled_generation_kwargs()
    assert kwargs["cache_implementation"] == "static" and kwargs["compile_config"]._compile_all_devices
    for beams in (1, 3):
        dynamic = model.generate(pixel_values=pixel_values, num_beams=beams, max_new_tokens=6)
        static = model.generate(pixel_values=pixel_values, num_beams=beams, max_new_tokens=6,
                                cache_implementation="static", disable_compile=True)  # compiling takes ~20 s
        assert torch.equal(dynamic, static)


def test_frozen_weight_casts_are_cached_without_changing_values_or_flags():
    """Sampling under --bf16 lets autocast keep one bf16 copy of each frozen weight (torch caches
    casts only of leaves that require grad); outputs equal the uncached region and the frozen
    flags come back, also when the body raises."""
    from trainers.sr_trainer import _cache_frozen_weight_casts

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    net[0].requires_grad_(False)
    x = torch.randn(3, 8)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        plain = net(x)
        with _cache_frozen_weight_casts(net):
            assert all(p.requires_grad for p in net.parameters())
            net(x)  # the cached bf16 copy is made here and reused by the next call
            cached = net(x)
    assert plain.dtype == torch.bfloat16 and torch.equal(plain, cached)
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]
    with pytest.raises(RuntimeError, match="boom"), _cache_frozen_weight_casts(net):
        raise RuntimeError("boom")
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]
    with _cache_frozen_weight_casts(net, enabled=False):  # fp32 runs: nothing flagged
        assert not net[0].weight.requires_grad
