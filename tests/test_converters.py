"""Checkpoint converters: tiny random checkpoints in the authors' NDLB release layout and in the
original ClipCap `.pt` layout, each run through an independent plain-torch implementation of the
source layout's forward, must give the converted model's logits (atol 1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel, AutoProcessor, GPT2Config, GPT2LMHeadModel

from modeling_clipcap import ClipCapForCaptioning, caption_stop_token_ids
from modeling_clipcap.convert_clipcap import convert_clipcap, load_clip_vision
from modeling_clipcap.convert_ndlb import convert_ndlb, ensure_converted, main as ndlb_main, real_vocab_size
from modeling_clipcap.conversion_utils import ConversionError
from tests.ndlb_release import OpenAIVisionTransformer

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEADS, PATCH, IMAGE, EMBED_DIM = 32, 2, 8, 32, 16  # tiny CLIP ViT: 16 patches + class token
N_EMBD, PREFIX, EXTRA = 32, 4, 24  # tiny GPT-2; the authors' patch adds batch x prefix extra rows
HEAD_ARGS = dict(vision_heads=HEADS, text_heads=2)


def perturb_(module: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Add noise to every parameter, so that zero biases and unit LayerNorm weights become distinct
    (a swapped or dropped tensor then changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


# -- independent source-layout models ---------------------------------------------------------------


def openai_text_tower(seed: int) -> dict[str, torch.Tensor]:
    """A few OpenAI CLIP text-tower tensors (dropped by the converter)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32, generator=g),
        "transformer.resblocks.0.ln_1.weight": torch.randn(32, generator=g),
        "token_embedding.weight": torch.randn(50, 32, generator=g),
        "positional_embedding": torch.randn(77, 32, generator=g),
        "ln_final.weight": torch.randn(32, generator=g), "ln_final.bias": torch.randn(32, generator=g),
        "text_projection": torch.randn(32, EMBED_DIM, generator=g), "logit_scale": torch.tensor(4.6),
    }


class OrigMLP(nn.Module):
    """ClipCap's MLP: `model` = Linear → Tanh → Linear (hidden = prefix * n_embd / 2)."""

    def __init__(self, clip_dim: int, prefix: int):
        super().__init__()
        self.prefix = prefix
        hidden = prefix * N_EMBD // 2
        self.model = nn.Sequential(nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, prefix * N_EMBD))

    def forward(self, x):
        return self.model(x).view(x.shape[0], self.prefix, N_EMBD)


class OrigAttention(nn.Module):
    """ClipCap's MultiHeadAttention (bias=False on queries and keys/values), einsum as in train.py."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q = self.to_queries(x).reshape(b, n, self.heads, c // self.heads)
        kv = self.to_keys_values(x).reshape(b, n, 2, self.heads, c // self.heads)
        k, v = kv[:, :, 0], kv[:, :, 1]
        att = (torch.einsum("bnhd,bmhd->bnmh", q, k) * (c // self.heads) ** -0.5).softmax(dim=2)
        return self.project(torch.einsum("bnmh,bmhd->bnhd", att, v).reshape(b, n, c))


class OrigLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = OrigAttention(dim, heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)  # mlp_ratio 2.0

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(self.norm2(x))))


class OrigTransformerMapper(nn.Module):
    """ClipCap's TransformerMapper: linear → clip_length tokens, + prefix_const, Transformer(8 heads)."""

    def __init__(self, clip_dim, prefix, clip_length, layers=2, heads=8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(OrigLayer(N_EMBD, heads) for _ in range(layers))
        self.linear = nn.Linear(clip_dim, clip_length * N_EMBD)
        self.prefix_const = nn.Parameter(torch.randn(prefix, N_EMBD))

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        x = torch.cat([x, self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        for layer in self.transformer.layers:
            x = layer(x)
        return x[:, self.clip_length :]


def tiny_gpt2(vocab: int, seed: int, n_positions: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=N_EMBD, n_layer=2, n_head=2, n_positions=n_positions,
                        n_inner=3 * N_EMBD)
    return perturb_(GPT2LMHeadModel(config), seed).eval()


def old_gpt2_buffers(prefix: str, n_layer: int = 2, n_positions: int = 64) -> dict[str, torch.Tensor]:
    """The causal-mask buffers older transformers saved in each block."""
    mask = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.bool)).view(1, 1, n_positions, n_positions)
    out = {}
    for i in range(n_layer):
        out[f"{prefix}transformer.h.{i}.attn.bias"] = mask.clone()
        out[f"{prefix}transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


class AuthorsSender(nn.Module):
    """The NDLB release's `ClipCapSender` in miniature: `clip.visual` + text tower, `clipcap.gpt`
    patched with extra rows and a -inf lm_head bias, `clipcap.clip_project` MLP."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.vocab = vocab
        self.clip = nn.Module()
        self.clip.visual = perturb_(OpenAIVisionTransformer(), seed + 1)
        self.clipcap = nn.Module()
        self.clipcap.gpt = tiny_gpt2(vocab, seed + 2)
        self.clipcap.clip_project = perturb_(OrigMLP(EMBED_DIM, PREFIX), seed + 3)
        # maybe_patch_gpt: resize to vocab + extra rows, add a bias that is 0 / -inf on the extras.
        self.clipcap.gpt.resize_token_embeddings(vocab + EXTRA)
        with torch.no_grad():
            self.clipcap.gpt.transformer.wte.weight[vocab:] = torch.randn(EXTRA, N_EMBD)  # stale prefixes
        bias = torch.randn(vocab + EXTRA) * 0.1  # the release's is 0 on the vocabulary; nonzero tests the copy
        bias[vocab:] = float("-inf")
        self.clipcap.gpt.lm_head.bias = nn.Parameter(bias, requires_grad=False)

    def checkpoint(self, lm_head: str = "absent") -> dict[str, torch.Tensor]:
        """State dict as saved: `lm_head` = "absent" (wte only), "both", or "only" (lm_head, no wte)."""
        state = {k: v.clone().contiguous() for k, v in self.state_dict().items()}
        wte, head = "clipcap.gpt.transformer.wte.weight", "clipcap.gpt.lm_head.weight"
        if lm_head == "absent":
            del state[head]
        elif lm_head == "only":
            del state[wte]
        state.update({"clip." + k: v for k, v in openai_text_tower(7).items()})
        state.update(old_gpt2_buffers("clipcap.gpt."))
        return state

    @torch.no_grad()
    def logits(self, pixel_values: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        """The authors' forward: write the prefix into the extra embedding rows and run GPT-2 on ids."""
        feats = self.clip.visual(pixel_values)
        prompts = self.clipcap.clip_project(feats)  # (B, P, n_embd)
        b, p, _ = prompts.shape
        gpt = self.clipcap.gpt
        gpt.transformer.wte.weight.data[self.vocab : self.vocab + b * p] = prompts.reshape(b * p, -1)
        prefix_ids = torch.arange(self.vocab, self.vocab + b * p).view(b, p)
        return gpt(input_ids=torch.cat([prefix_ids, caption_ids], dim=1)).logits


RELEASE_CONFIG = {"clip_model": "ViT-B/32", "clipcap_path": "modded_mle.pt", "official_clipcap_weights": "c.pt",
                  "best_model_path": "best.pt", "train_method": "discriminative", "do_sample": False,
                  "beam_size": 5, "max_len": 50}


def write_release(folder: Path, state: dict[str, torch.Tensor], fmt: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(RELEASE_CONFIG))
    return folder


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def sender(tokenizer):
    return AuthorsSender(len(tokenizer)).eval()


@pytest.fixture(scope="module")
def inputs(tokenizer):
    g = torch.Generator().manual_seed(5)
    pixel_values = torch.randn(3, 3, IMAGE, IMAGE, generator=g)
    caption_ids = torch.randint(0, len(tokenizer), (3, 7), generator=g)
    return pixel_values, caption_ids


def converted_logits(model, inputs):
    with torch.no_grad():
        return model(pixel_values=inputs[0], input_ids=inputs[1]).logits


# -- NDLB release ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lm_head, fmt", [("absent", "safetensors"), ("both", "safetensors"), ("only", "safetensors"),
                                          ("absent", "bin")])
def test_ndlb_logits_match_authors_forward(tmp_path, sender, inputs, tokenizer, tokenizer_dir, lm_head, fmt):
    src = write_release(tmp_path / "release", sender.checkpoint(lm_head), fmt)
    out = convert_ndlb(src, tmp_path / "out", tokenizer=tokenizer_dir, **HEAD_ARGS)
    model = ClipCapForCaptioning.from_pretrained(out).eval()
    vocab = len(tokenizer)
    assert model.config.text_config.vocab_size == vocab  # extra rows dropped, real size from the bias
    assert model.config.prefix_length == PREFIX and model.config.mapper_hidden_size == PREFIX * N_EMBD // 2
    assert model.config.vision_config.image_size == IMAGE and model.config.lm_head_bias
    expected = sender.logits(*inputs)[..., :vocab]  # real-vocabulary slice
    torch.testing.assert_close(converted_logits(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_ndlb_cli_writes_a_loadable_folder(tmp_path, sender, inputs, tokenizer, tokenizer_dir):
    src = write_release(tmp_path / "release", sender.checkpoint("absent"))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "modeling_clipcap.convert_ndlb", str(src), str(out),
                          "--tokenizer", tokenizer_dir, "--vision-heads", "2", "--text-heads", "2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = sender.logits(*inputs)[..., : len(tokenizer)]
    for model in (ClipCapForCaptioning.from_pretrained(out), AutoModel.from_pretrained(out, trust_remote_code=True)):
        torch.testing.assert_close(converted_logits(model.eval(), inputs), expected, atol=1e-5, rtol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_clipcap.ClipCapForCaptioning"
    assert config["stop_token_ids"] == caption_stop_token_ids(tokenizer) and config["stop_token_ids"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["num_beams"] == 5 and generation["max_new_tokens"] == 50 - PREFIX  # max_len counts the prefix
    assert set(caption_stop_token_ids(tokenizer)) <= set(generation["eos_token_id"])


ODD_SIZES = [(61, 41), (41, 61), (45, 31), (33, 32), (50, 35), (97, 40)]  # (width, height)


def openai_transform(size: int):
    """OpenAI CLIP's `clip.load(...)[1]` (clip/clip.py `_transform`), written out in torchvision."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      lambda im: im.convert("RGB"), T.ToTensor(),
                      T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def odd_images(seed: int = 3):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in ODD_SIZES]


def test_processor_files_follow_the_authors_transform(tmp_path, sender, tokenizer_dir):
    """AutoProcessor loads from the converted folder; its pixels equal OpenAI CLIP's own transform
    on odd image sizes (bicubic resize of the short side, center crop with the offset rounded:
    (61, 41) resizes to 47 x 32 and is cropped at column 8, where transformers' processor takes 7)."""
    out = convert_ndlb(write_release(tmp_path / "release", sender.checkpoint()), tmp_path / "out",
                       tokenizer=tokenizer_dir, **HEAD_ARGS)
    processor = AutoProcessor.from_pretrained(out)
    images = odd_images()
    ours = processor(images=images)["pixel_values"]
    assert ours.shape == (len(images), 3, IMAGE, IMAGE)
    theirs = torch.stack([openai_transform(IMAGE)(im) for im in images])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    plain = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]  # floor crop, tensor resize
    assert (plain - theirs).abs().amax(dim=(1, 2, 3)).max() > 0.1
    assert processor(text="a star")["input_ids"].shape[1] >= 2


def test_converted_release_decodes_as_the_release(tmp_path, sender, tokenizer, tokenizer_dir):
    out = convert_ndlb(write_release(tmp_path / "release", sender.checkpoint()), tmp_path / "out",
                       tokenizer=tokenizer_dir, **HEAD_ARGS)
    config = json.loads((out / "config.json").read_text())
    assert config["length_normalization"] == "with_prefix"  # transformers 4.29's beam ranking
    assert config["stop_token_ids"] == caption_stop_token_ids(tokenizer)  # NDLB's rule: any token with "."
    processor = AutoProcessor.from_pretrained(out)
    ids = tokenizer.encode("two stars , on the left .")
    assert processor.decode(ids) == "two stars, on the left."  # clean_up_tokenization_spaces, as 4.29.2
    assert tokenizer.decode(ids) == "two stars , on the left ."  # (transformers 5's default leaves the spaces)
    other = convert_ndlb(tmp_path / "release", tmp_path / "other", tokenizer=tokenizer_dir,
                         length_normalization="generated", **HEAD_ARGS)
    assert json.loads((other / "config.json").read_text())["length_normalization"] == "generated"


def test_ensure_converted_converts_releases_once_and_passes_ours_through(tmp_path, sender, inputs, tokenizer,
                                                                         tiny_clipcap_dir):
    assert ensure_converted(tiny_clipcap_dir, cache_dir=tmp_path / "cache") == str(tiny_clipcap_dir)
    assert ensure_converted("someone/missing-repo", cache_dir=tmp_path / "cache") == "someone/missing-repo"  # offline
    release = write_release(tmp_path / "release", sender.checkpoint("only"))
    tokenizer.save_pretrained(release)  # a tokenizer inside the release folder is used
    folder = ensure_converted(release, cache_dir=tmp_path / "cache", **HEAD_ARGS)
    assert Path(folder).parent == tmp_path / "cache"
    model = ClipCapForCaptioning.from_pretrained(folder).eval()
    expected = sender.logits(*inputs)[..., : len(tokenizer)]
    torch.testing.assert_close(converted_logits(model, inputs), expected, atol=1e-5, rtol=1e-5)
    stamp = (Path(folder) / "model.safetensors").stat().st_mtime_ns
    assert ensure_converted(release, cache_dir=tmp_path / "cache", **HEAD_ARGS) == folder  # reused, not redone
    assert (Path(folder) / "model.safetensors").stat().st_mtime_ns == stamp


def test_real_vocab_size_reads_the_inf_tail():
    assert real_vocab_size(torch.tensor([0.0, 0.0, 0.0, float("-inf"), float("-inf")]), "x") == 3
    assert real_vocab_size(torch.zeros(5), "x") == 5
    with pytest.raises(ConversionError, match="inside the vocabulary"):
        real_vocab_size(torch.tensor([0.0, float("-inf"), 0.0, float("-inf")]), "x")


# -- original ClipCap .pt -----------------------------------------------------------------------------


@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_clipcap_pt_logits_match_original_forward(tmp_path, tiny_clip_judge_dir, inputs, tokenizer, tokenizer_dir,
                                                  mapping):
    vocab = len(tokenizer)
    gpt = tiny_gpt2(vocab, seed=11)
    prefix, clip_length = (PREFIX, None) if mapping == "mlp" else (5, 3)
    torch.manual_seed(12)
    mapper = OrigMLP(EMBED_DIM, prefix) if mapping == "mlp" else OrigTransformerMapper(EMBED_DIM, prefix, clip_length)
    perturb_(mapper, 13)
    state = {**{"gpt." + k: v for k, v in gpt.state_dict().items()},  # lm_head.weight included, as torch.save keeps it
             **{"clip_project." + k: v for k, v in mapper.state_dict().items()}, **old_gpt2_buffers("gpt.")}
    torch.save(state, tmp_path / "coco_weights.pt")

    out = convert_clipcap(tmp_path / "coco_weights.pt", tmp_path / "out", clip=str(tiny_clip_judge_dir),
                          tokenizer=tokenizer_dir, text_heads=2)
    model = ClipCapForCaptioning.from_pretrained(out).eval()
    assert model.config.mapping_type == mapping and model.config.prefix_length == prefix
    if mapping == "transformer":
        assert model.config.clip_length == clip_length and model.config.mapper_num_heads == 8
        assert model.config.mapper_num_layers == 2

    pixel_values, caption_ids = inputs
    with torch.no_grad():  # ClipCap: CLIP image features → mapper → GPT-2 on [prefix, caption embeddings]
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(tiny_clip_judge_dir)
        feats = clip.get_image_features(pixel_values=pixel_values).pooler_output
        prefix_embeds = mapper(feats)
        embeds = torch.cat([prefix_embeds, gpt.transformer.wte(caption_ids)], dim=1)
        expected = gpt(inputs_embeds=embeds).logits
    torch.testing.assert_close(converted_logits(model, inputs), expected, atol=1e-5, rtol=1e-5)


DOT_SCALES = [5.0, 2.0, 3.0]  # embedding-row scales of ".", "..", "...": captions that end at "." and ones with ".."


def clipcap_generate2(gpt, prefix_embeds: torch.Tensor, stop_id: int, entry_length: int = 67) -> list[int]:
    """ClipCap's greedy `generate2` (predict.py) for one image: argmax (its top-p filter never removes
    the argmax) on [prefix, caption embeddings] without a cache, until the exact stop token."""
    tokens, embeds = [], prefix_embeds  # (1, P, D)
    for _ in range(entry_length):
        token = int(gpt(inputs_embeds=embeds).logits[0, -1].argmax())
        tokens.append(token)
        embeds = torch.cat([embeds, gpt.transformer.wte(torch.tensor([[token]]))], dim=1)
        if token == stop_id:
            break
    return tokens


def test_converted_clipcap_stops_as_clipcap(tmp_path, tiny_clip_judge_dir, tokenizer, tokenizer_dir):
    """ClipCap's own stop rule survives conversion: the exact "." token (not "..", "...", nor
    end-of-text), at most 67 tokens; greedy captions equal its `generate2` token for token."""
    from transformers import CLIPModel

    vocab = len(tokenizer)
    gpt = tiny_gpt2(vocab, seed=21, n_positions=128)
    dots = [tokenizer.convert_tokens_to_ids(t) for t in (".", "..", "...")]
    with torch.no_grad():  # make the period tokens likely, so that captions end at mixed lengths
        gpt.transformer.wte.weight[dots] *= torch.tensor(DOT_SCALES)[:, None]
    torch.manual_seed(22)
    mapper = perturb_(OrigMLP(EMBED_DIM, PREFIX), 23, scale=1.0)
    state = {**{"gpt." + k: v for k, v in gpt.state_dict().items()},
             **{"clip_project." + k: v for k, v in mapper.state_dict().items()}}
    torch.save(state, tmp_path / "coco_weights.pt")
    out = convert_clipcap(tmp_path / "coco_weights.pt", tmp_path / "out", clip=str(tiny_clip_judge_dir),
                          tokenizer=tokenizer_dir, text_heads=2)
    model = ClipCapForCaptioning.from_pretrained(out).eval()
    period = tokenizer.encode(".")[0]
    assert model.config.stop_token_ids == [period] and model.generation_config.eos_token_id == [period]
    assert model.generation_config.max_new_tokens == 67 and model.config.length_normalization == "generated"

    pixel_values = torch.randn(12, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(24))
    ours = model.generate(pixel_values=pixel_values, num_beams=1).tolist()
    with torch.no_grad():
        clip = CLIPModel.from_pretrained(tiny_clip_judge_dir)
        prefixes = mapper(clip.get_image_features(pixel_values=pixel_values).pooler_output)
        theirs = [clipcap_generate2(gpt, prefixes[i : i + 1], period) for i in range(len(pixel_values))]
    assert [row[: len(ref)] for row, ref in zip(ours, theirs)] == theirs
    assert all(set(row[len(ref):]) <= {tokenizer.pad_token_id} for row, ref in zip(ours, theirs))
    assert any(ref[-1] == period and len(ref) < 67 for ref in theirs)  # ended at "."
    # NDLB's rule would have stopped earlier, at ".." / "...", in some of them
    assert any(set(ref[:-1]) & set(dots[1:]) for ref in theirs)


def test_load_clip_vision_takes_projection_from_full_clip(tiny_clip_judge_dir):
    vision = load_clip_vision(str(tiny_clip_judge_dir))
    assert vision.visual_projection.weight.shape == (16, 32)


# -- errors -------------------------------------------------------------------------------------------


class NotATensor:
    pass


def garble(state, how):
    state = dict(state)
    if how == "missing":
        del state["clip.visual.proj"]
    elif how == "unknown":
        state["clipcap.adapter.weight"] = torch.zeros(3, 5)
    elif how == "shape":
        state["clipcap.clip_project.model.2.weight"] = torch.zeros(PREFIX * N_EMBD + 3, PREFIX * N_EMBD // 2)
        state["clipcap.clip_project.model.2.bias"] = torch.zeros(PREFIX * N_EMBD + 3)
    elif how == "bias":
        state["clipcap.gpt.lm_head.bias"] = state["clipcap.gpt.lm_head.bias"].flip(0)
    return state


@pytest.mark.parametrize("how, message", [
    ("missing", r"missing tensor 'clip\.visual\.proj'"),
    ("unknown", r"clipcap\.adapter\.weight \(3, 5\) float32"),
    ("shape", r"not a multiple of GPT-2's width 32"),
    ("bias", r"-inf/nan entries inside the vocabulary"),
])
def test_garbled_ndlb_checkpoint_gives_clear_error(tmp_path, sender, tokenizer_dir, how, message):
    src = write_release(tmp_path / "release", garble(sender.checkpoint(), how))
    with pytest.raises(ConversionError, match=message):
        convert_ndlb(src, tmp_path / "out", tokenizer=tokenizer_dir, **HEAD_ARGS)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_unreadable_files_and_cli_errors(tmp_path, sender, tokenizer_dir, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConversionError, match=r"corrupt.model\.safetensors is not a readable safetensors file"):
        convert_ndlb(corrupt, tmp_path / "out", tokenizer=tokenizer_dir, **HEAD_ARGS)

    pickled = tmp_path / "evil.pt"
    torch.save({"gpt.x": NotATensor()}, pickled)
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert_clipcap(pickled, tmp_path / "out", tokenizer=tokenizer_dir)

    ndlb_pt = tmp_path / "ndlb.pt"
    torch.save(sender.checkpoint(), ndlb_pt)
    with pytest.raises(ConversionError, match="use convert_ndlb"):
        convert_clipcap(ndlb_pt, tmp_path / "out", tokenizer=tokenizer_dir)

    # CLI: exit status 1 and a one-paragraph message, no traceback; heads that shapes cannot give.
    src = write_release(tmp_path / "release", sender.checkpoint())
    assert ndlb_main([str(src), str(tmp_path / "out"), "--tokenizer", tokenizer_dir]) == 1
    err = capsys.readouterr().err
    assert "error: Cannot infer the attention heads of the CLIP vision tower" in err and "--vision-heads" in err
    assert "Traceback" not in err
    assert ndlb_main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "neither an existing folder/file nor a Hub repo id" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert ndlb_main([str(src), str(tmp_path / "out"), "--tokenizer", tokenizer_dir, "--vision-heads", "2"]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_dtype_option(tmp_path, sender, tokenizer_dir):
    out = convert_ndlb(write_release(tmp_path / "release", sender.checkpoint()), tmp_path / "out",
                       tokenizer=tokenizer_dir, dtype="bfloat16", **HEAD_ARGS)
    model = ClipCapForCaptioning.from_pretrained(out, dtype="auto")
    assert model.mapper.model[0].weight.dtype == torch.bfloat16
