"""Shared pieces of the checkpoint converters (`convert_ndlb`, `convert_clipcap`).

Both converters turn a foreign state dict into a [`ClipCapForCaptioning`] ("No Detail Left
Behind", Sec. 4.1: CLIP ViT → MLP mapper → 10 prefix tokens → GPT-2; the original ClipCap of
Mokady et al., 2021 with its MLP or transformer mapper). The helpers here

- read weights safely (safetensors, or `torch.load(weights_only=True)`; never plain pickle),
- track which source tensors were used or deliberately ignored ([`SourceTensors`]), so that a
  conversion never silently drops or invents a tensor,
- map OpenAI-layout CLIP vision towers, GPT-2 and the ClipCap mappers to our parameter names while
  inferring every size from the tensors' shapes (attention heads, which shapes do not show, follow
  the 64-wide-head convention of OpenAI CLIP and GPT-2 unless given),
- fill a model, checking that every target parameter was filled with a tensor of the right shape,
- build the processor files as the source decoded and preprocessed (OpenAI CLIP's own image
  transform, transformers 4.x's clean-up of tokenisation spaces) and save the result atomically.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .processing_clipcap import ClipCapProcessor

logger = logging.getLogger(__name__)

WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Buffers older transformers versions saved in every GPT-2 block (causal mask and its fill value).
GPT2_OLD_BUFFERS = ("attn.bias", "attn.masked_bias")
# transformers 4.x cleaned up tokenisation spaces when decoding ("a dog , ." -> "a dog, ."; the
# authors' release decodes with clean_up_tokenization_spaces=True, ClipCap with 4.x's default);
# transformers 5 skips it for BPE tokenizers unless told to. Converted tokenizers keep the old text.
LEGACY_DECODING = {"clean_up_tokenization_spaces": True,
                   "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True}


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file, keys and shapes involved."""


def shape_of(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


# -- reading ----------------------------------------------------------------------------------


def find_weights_file(folder: Path, names: Iterable[str] = WEIGHT_FILE_NAMES, patterns: Iterable[str] = ()) -> Path:
    """The first of `names` (then the only file matching one of `patterns`) inside `folder`."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    matches = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
    wanted = " or ".join([*names, *patterns])
    if len(matches) > 1:
        raise ConversionError(f"{folder} holds several candidate weight files ({', '.join(m.name for m in matches)}); "
                              "pass the one to convert.")
    raise ConversionError(f"No weights file ({wanted}) in {folder}; it contains: {listing}.")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a `.safetensors` file or a `.bin`/`.pt` file saved with `torch.save`.

    Pickled files are read with `torch.load(weights_only=True)`, which refuses arbitrary objects.
    A dict that wraps the weights under `"state_dict"` or `"model"` is unwrapped, and a common
    `"module."` prefix (DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"Weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error type for corrupt headers
            raise ConversionError(f"{path} is not a readable safetensors file ({err}).") from err
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
            raise ConversionError(
                f"{path} could not be read with torch.load(weights_only=True): {str(err).splitlines()[0]} "
                "It must be a plain state dict of tensors (arbitrary pickled objects are refused)."
            ) from err
    else:
        raise ConversionError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors, "
                              f"{', '.join(PICKLE_SUFFIXES)}.")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and len(state) <= 4:
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}.")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


# -- source bookkeeping -------------------------------------------------------------------------


class SourceTensors:
    """A source state dict that remembers which tensors were used and which were ignored on purpose.

    `check_all_used()` then fails on anything else, naming the keys and shapes.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], origin: str):
        self.tensors = state_dict
        self.origin = origin
        self.used: set[str] = set()
        self.ignored: dict[str, str] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]

    def take(self, key: str) -> torch.Tensor:
        """The tensor under `key`, marked as used; a clear error when absent."""
        if key not in self.tensors:
            stem = key.rsplit(".", 2)[0]
            near = sorted(k for k in self.tensors if k.startswith(stem))[:8]
            hint = f" Keys under {stem!r}: {', '.join(near)}." if near else ""
            raise ConversionError(f"{self.origin}: missing tensor {key!r}.{hint}")
        self.used.add(key)
        return self.tensors[key]

    def take_optional(self, key: str) -> torch.Tensor | None:
        return self.take(key) if key in self.tensors else None

    def ignore(self, predicate: Callable[[str], bool], reason: str) -> int:
        """Mark every not-yet-used key for which `predicate(key)` holds as deliberately ignored."""
        n = 0
        for key in self.tensors:
            if key not in self.used and predicate(key):
                self.ignored[key] = reason
                n += 1
        return n

    def layer_indices(self, prefix: str) -> list[int]:
        """Sorted block indices `i` of keys `prefix{i}.…`; checks they run 0..n-1."""
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        found = sorted({int(m.group(1)) for k in self.tensors if (m := pattern.match(k))})
        if found != list(range(len(found))):
            raise ConversionError(f"{self.origin}: blocks under {prefix!r} are not numbered 0..n-1: {found}.")
        return found

    def check_all_used(self) -> None:
        leftover = [k for k in self.tensors if k not in self.used and k not in self.ignored]
        if leftover:
            listing = "\n  ".join(f"{k} {shape_of(self.tensors[k])}" for k in leftover[:30])
            more = f"\n  ... and {len(leftover) - 30} more" if len(leftover) > 30 else ""
            raise ConversionError(
                f"{self.origin}: {len(leftover)} source tensor(s) were neither converted nor known to be safe "
                f"to drop, so this checkpoint has a layout the converter does not understand:\n  {listing}{more}"
            )

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for reason in self.ignored.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        dropped = "; ".join(f"{n} {r}" for r, n in reasons.items()) or "none"
        return f"{len(self.used)} source tensors converted, ignored: {dropped}"


def expect_shape(origin: str, key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"{origin}: {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)} "
                              "from the other tensors' shapes.")


def attention_heads(width: int, given: int | None, what: str, option: str) -> int:
    """`given`, or width // 64 (the OpenAI CLIP / GPT-2 convention of 64-wide heads)."""
    if given is None:
        if width % 64 or width < 64:
            raise ConversionError(f"Cannot infer the attention heads of the {what} (width {width} is not a "
                                  f"multiple of 64, the usual head width); pass {option}.")
        return width // 64
    if given < 1 or width % given:
        raise ConversionError(f"{option} {given} does not divide the {what} width {width}.")
    return given


# -- OpenAI CLIP vision tower → CLIPVisionModelWithProjection -------------------------------------


def convert_openai_clip_vision(
    src: SourceTensors, prefix: str, num_heads: int | None = None
) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """OpenAI-layout CLIP ViT (`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
    `transformer.resblocks.{i}`, `ln_post`, `proj`) under `prefix` → (config, state dict of a
    `CLIPVisionModelWithProjection`). Sizes come from the shapes; `proj` (width × dim, applied as
    `x @ proj`) becomes `visual_projection.weight` (dim × width)."""
    if src.keys_with_prefix(prefix + "attnpool.") or src.keys_with_prefix(prefix + "layer1."):
        raise ConversionError(f"{src.origin}: the vision tower under {prefix!r} is a ResNet CLIP; only ViT towers "
                              "are supported.")
    conv = src.take(prefix + "conv1.weight")  # (width, channels, patch, patch)
    if conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
        raise ConversionError(f"{src.origin}: {prefix}conv1.weight has shape {tuple(conv.shape)}, expected a square "
                              "patch kernel (width, channels, patch, patch).")
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    positions = src.take(prefix + "positional_embedding")  # (1 + grid², width)
    grid = math.isqrt(positions.shape[0] - 1)
    if positions.ndim != 2 or grid * grid != positions.shape[0] - 1 or positions.shape[1] != width:
        raise ConversionError(f"{src.origin}: {prefix}positional_embedding has shape {tuple(positions.shape)}, "
                              f"expected (1 + grid², {width}).")
    proj = src.take(prefix + "proj")  # (width, projection_dim)
    expect_shape(src.origin, prefix + "proj", proj, (width, proj.shape[-1]))
    layers = src.layer_indices(prefix + "transformer.resblocks.")
    if not layers:
        raise ConversionError(f"{src.origin}: no transformer blocks under {prefix}transformer.resblocks.")
    block0 = f"{prefix}transformer.resblocks.0."
    intermediate = src.tensors[block0 + "mlp.c_fc.weight"].shape[0] if block0 + "mlp.c_fc.weight" in src else 0
    heads = attention_heads(width, num_heads, "CLIP vision tower", "--vision-heads")
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=intermediate, num_hidden_layers=len(layers), num_attention_heads=heads,
        num_channels=channels, image_size=grid * patch, patch_size=patch, projection_dim=proj.shape[1],
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )

    out: dict[str, torch.Tensor] = {}
    emb = "vision_model.embeddings."
    out[emb + "patch_embedding.weight"] = conv
    out[emb + "class_embedding"] = src.take(prefix + "class_embedding")
    out[emb + "position_embedding.weight"] = positions
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            out[f"vision_model.{ours}.{p}"] = src.take(f"{prefix}{theirs}.{p}")
    for i in layers:
        s, t = f"{prefix}transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        in_w = src.take(s + "attn.in_proj_weight")  # (3 width, width): q, k, v stacked
        in_b = src.take(s + "attn.in_proj_bias")
        expect_shape(src.origin, s + "attn.in_proj_weight", in_w, (3 * width, width))
        expect_shape(src.origin, s + "attn.in_proj_bias", in_b, (3 * width,))
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[t + f"self_attn.{name}.weight"] = in_w[j * width : (j + 1) * width]
            out[t + f"self_attn.{name}.bias"] = in_b[j * width : (j + 1) * width]
        pairs = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
        for ours, theirs in pairs:
            for p in ("weight", "bias"):
                out[f"{t}{ours}.{p}"] = src.take(f"{s}{theirs}.{p}")
    out["visual_projection.weight"] = proj.t().contiguous()  # x @ proj == x @ W.T with W = proj.T
    return config, out


# -- GPT-2 ------------------------------------------------------------------------------------------

GPT2_BLOCK_PARAMS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")


def convert_gpt2(
    src: SourceTensors, prefix: str, vocab_size: int | None = None, num_heads: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A `GPT2LMHeadModel` state dict under `prefix` → (GPT2Config kwargs, state dict over the first
    `vocab_size` rows of the vocabulary). Token embeddings come from `transformer.wte.weight`, or from
    `lm_head.weight` when only that copy of the tied matrix was saved; both must agree when both are
    present. `lm_head.bias` is left to the caller; the old `attn.bias`/`attn.masked_bias` buffers
    are ignored."""
    wte = src.take_optional(prefix + "transformer.wte.weight")
    head = src.take_optional(prefix + "lm_head.weight")
    if wte is None and head is None:
        raise ConversionError(f"{src.origin}: neither {prefix}transformer.wte.weight nor {prefix}lm_head.weight is "
                              "present, so the token embeddings are missing.")
    if wte is not None and head is not None and (wte.shape != head.shape or not torch.equal(wte, head)):
        raise ConversionError(f"{src.origin}: {prefix}lm_head.weight {shape_of(head)} differs from "
                              f"{prefix}transformer.wte.weight {shape_of(wte)}; GPT-2's output layer is tied to its "
                              "embeddings, untied heads are not supported.")
    wte = wte if wte is not None else head
    rows, n_embd = wte.shape
    vocab_size = rows if vocab_size is None else vocab_size
    if not 0 < vocab_size <= rows:
        raise ConversionError(f"{src.origin}: vocabulary size {vocab_size} does not fit the {rows} embedding rows.")
    wpe = src.take(prefix + "transformer.wpe.weight")
    expect_shape(src.origin, prefix + "transformer.wpe.weight", wpe, (wpe.shape[0], n_embd))
    layers = src.layer_indices(prefix + "transformer.h.")
    if not layers:
        raise ConversionError(f"{src.origin}: no GPT-2 blocks under {prefix}transformer.h.")
    c_fc = src.tensors.get(f"{prefix}transformer.h.0.mlp.c_fc.weight")
    n_inner = c_fc.shape[1] if c_fc is not None else None  # Conv1D weights are (in, out)
    heads = attention_heads(n_embd, num_heads, "GPT-2", "--text-heads")
    config = dict(vocab_size=vocab_size, n_positions=wpe.shape[0], n_embd=n_embd, n_layer=len(layers), n_head=heads,
                  n_inner=n_inner)

    out = {"transformer.wte.weight": wte[:vocab_size], "transformer.wpe.weight": wpe}
    out["lm_head.weight"] = out["transformer.wte.weight"]  # tied
    for i in layers:
        block = f"transformer.h.{i}."
        for name in GPT2_BLOCK_PARAMS:
            for p in ("weight", "bias"):
                out[f"{block}{name}.{p}"] = src.take(f"{prefix}{block}{name}.{p}")
    for p in ("weight", "bias"):
        out[f"transformer.ln_f.{p}"] = src.take(f"{prefix}transformer.ln_f.{p}")
    src.ignore(lambda k: k.startswith(prefix + "transformer.h.") and k.endswith(GPT2_OLD_BUFFERS),
               "old GPT-2 attention buffers (attn.bias, attn.masked_bias)")
    return config, out


# -- ClipCap mappers --------------------------------------------------------------------------------

MAPPER_LAYER_PARAMS = ("norm1.weight", "norm1.bias", "attn.to_queries.weight", "attn.to_keys_values.weight",
                       "attn.project.weight", "attn.project.bias", "norm2.weight", "norm2.bias",
                       "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def convert_mapper(
    src: SourceTensors, prefix: str, n_embd: int, num_heads: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ClipCap mapper under `prefix` (e.g. `clip_project.`) → (ClipCapConfig kwargs, state dict
    under `mapper.`). MLP (`model.0` → Tanh → `model.2`): prefix length = output size / n_embd.
    Transformer mapper (`linear`, `prefix_const`, `transformer.layers.{i}`): prefix length = rows of
    `prefix_const`, clip_length = `linear` output / n_embd, 8 heads unless given (as in ClipCap)."""
    if prefix + "model.0.weight" in src:
        linear_ids = sorted({int(k[len(prefix) + 6 :].split(".")[0]) for k in src.keys_with_prefix(prefix + "model.")})
        if linear_ids != [0, 2]:
            raise ConversionError(f"{src.origin}: the MLP mapper under {prefix}model. has layers {linear_ids}; only "
                                  "Linear → Tanh → Linear (model.0, model.2) is supported.")
        w0, b0 = src.take(prefix + "model.0.weight"), src.take(prefix + "model.0.bias")
        w2, b2 = src.take(prefix + "model.2.weight"), src.take(prefix + "model.2.bias")
        hidden, clip_dim = w0.shape
        expect_shape(src.origin, prefix + "model.2.weight", w2, (w2.shape[0], hidden))
        if w2.shape[0] % n_embd:
            raise ConversionError(f"{src.origin}: the MLP mapper's output size {w2.shape[0]} ({prefix}model.2.weight "
                                  f"{tuple(w2.shape)}) is not a multiple of GPT-2's width {n_embd}.")
        config = dict(mapping_type="mlp", prefix_length=w2.shape[0] // n_embd, clip_embed_dim=clip_dim,
                      mapper_hidden_size=hidden)
        tensors = {"mapper.model.0.weight": w0, "mapper.model.0.bias": b0,
                   "mapper.model.2.weight": w2, "mapper.model.2.bias": b2}
        return config, tensors
    if prefix + "linear.weight" in src:
        linear_w, linear_b = src.take(prefix + "linear.weight"), src.take(prefix + "linear.bias")
        const = src.take(prefix + "prefix_const")  # (prefix_length, n_embd)
        expect_shape(src.origin, prefix + "prefix_const", const, (const.shape[0], n_embd))
        if linear_w.shape[0] % n_embd:
            raise ConversionError(f"{src.origin}: {prefix}linear.weight {tuple(linear_w.shape)}: output size is not a "
                                  f"multiple of GPT-2's width {n_embd}.")
        layers = src.layer_indices(prefix + "transformer.layers.")
        heads = num_heads if num_heads is not None else 8
        if n_embd % heads:
            raise ConversionError(f"--mapper-heads {heads} does not divide the mapper width {n_embd}.")
        tensors = {"mapper.linear.weight": linear_w, "mapper.linear.bias": linear_b, "mapper.prefix_const": const}
        for i in layers:
            for name in MAPPER_LAYER_PARAMS:
                tensors[f"mapper.layers.{i}.{name}"] = src.take(f"{prefix}transformer.layers.{i}.{name}")
            fc1 = tensors[f"mapper.layers.{i}.mlp.fc1.weight"]
            if fc1.shape[0] != 2 * n_embd:
                raise ConversionError(f"{src.origin}: {prefix}transformer.layers.{i}.mlp.fc1.weight has shape "
                                      f"{tuple(fc1.shape)}; only ClipCap's mlp_ratio 2.0 ({2 * n_embd}) is supported.")
        config = dict(mapping_type="transformer", prefix_length=const.shape[0], clip_embed_dim=linear_w.shape[1],
                      clip_length=linear_w.shape[0] // n_embd, mapper_num_layers=len(layers), mapper_num_heads=heads)
        return config, tensors
    found = ", ".join(sorted(src.keys_with_prefix(prefix))[:8]) or "no keys"
    raise ConversionError(f"{src.origin}: no ClipCap mapper under {prefix!r} (expected {prefix}model.0.weight for the "
                          f"MLP or {prefix}linear.weight for the transformer mapper); found {found}.")


# -- filling and saving -----------------------------------------------------------------------------


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def fill_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], origin: str) -> None:
    """Load `tensors` into `model`, failing with the keys and shapes when a parameter would stay
    unfilled, a converted tensor has no place, or a shape disagrees."""
    target = model.state_dict()
    missing = [k for k in target if k not in tensors]
    unexpected = [k for k in tensors if k not in target]
    wrong = [k for k in tensors if k in target and tuple(tensors[k].shape) != tuple(target[k].shape)]
    problems = []
    if missing:
        listing = "\n  ".join(f"{k} {shape_of(target[k])}" for k in missing)
        problems.append(f"target parameters left unfilled:\n  {listing}")
    if unexpected:
        listing = "\n  ".join(f"{k} {shape_of(tensors[k])}" for k in unexpected)
        problems.append(f"converted tensors with no target:\n  {listing}")
    if wrong:
        problems.append("shape mismatches (converted vs target):\n  " + "\n  ".join(
            f"{k}: {tuple(tensors[k].shape)} vs {tuple(target[k].shape)}" for k in wrong))
    if problems:
        raise ConversionError(f"{origin}: the converted weights do not fit the model.\n" + "\n".join(problems))
    with torch.no_grad():
        model.load_state_dict({k: v.to(target[k].dtype) for k, v in tensors.items()}, strict=True)


def build_image_processor(image_size: int) -> CLIPImageProcessor:
    """CLIP preprocessing as the authors' `clip.load` transform: bicubic resize of the short side to
    `image_size`, center crop, RGB, OpenAI CLIP mean/std."""
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size}, resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, do_normalize=True, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


def build_processor(image_size: int, tokenizer) -> ClipCapProcessor:
    """The processor saved with a converted checkpoint: OpenAI CLIP's own image transform (pixel
    values equal to `clip.load(...)[1]`'s, as the authors' release and ClipCap preprocessed) and
    the tokenizer (from [`load_tokenizer`], so decoding cleans up tokenisation spaces as 4.x did)."""
    return ClipCapProcessor(build_image_processor(image_size), tokenizer, openai_clip_transform=True)


def load_tokenizer(name_or_path: str):
    """A GPT-2 tokenizer that decodes as transformers 4.x did ([`LEGACY_DECODING`])."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, **LEGACY_DECODING)
    except Exception as err:  # OSError / ValueError / hub errors: report which tokenizer failed
        raise ConversionError(f"Could not load the tokenizer {name_or_path!r} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}). Pass --tokenizer with a GPT-2 "
                              "tokenizer id or folder.") from err


def text_config_tokens(tokenizer, vocab_size: int, origin: str) -> dict[str, int]:
    """bos/eos/pad ids for GPT2Config from the tokenizer, after checking it fits the vocabulary."""
    if len(tokenizer) > vocab_size:
        raise ConversionError(f"{origin}: the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} "
                              "embedding rows; pass the tokenizer the model was trained with (--tokenizer).")
    if len(tokenizer) < vocab_size:
        logger.warning("The tokenizer has %d tokens, the model %d embedding rows.", len(tokenizer), vocab_size)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConversionError(f"{out_dir} already exists and is not empty; pass --overwrite to replace it.")


def save_converted(model, processor, out_dir: str | Path, overwrite: bool = False) -> Path:
    """`model.save_pretrained` + `processor.save_pretrained` into a temporary sibling folder that then
    replaces `out_dir` (a failed run leaves no half-written folder)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# -- command line -----------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default="gpt2",
                        help="GPT-2 tokenizer id or folder for the processor files (default: gpt2).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the saved weights (default: float32).")
    parser.add_argument("--text-heads", type=int, default=None,
                        help="GPT-2 attention heads (default: width / 64).")
    parser.add_argument("--mapper-heads", type=int, default=None,
                        help="transformer mapper attention heads (default: 8, as in ClipCap).")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists.")


def run_cli(convert: Callable[[argparse.Namespace], Path], args: argparse.Namespace) -> int:
    """Run `convert(args)`; a ConversionError becomes a one-paragraph message and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert(args)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Saved the converted model and processor to {out}")
    return 0


__all__ = [
    "LEGACY_DECODING",
    "ConversionError",
    "SourceTensors",
    "add_common_arguments",
    "attention_heads",
    "build_image_processor",
    "build_processor",
    "check_out_dir",
    "convert_gpt2",
    "convert_mapper",
    "convert_openai_clip_vision",
    "fill_model",
    "find_weights_file",
    "load_state_dict",
    "load_tokenizer",
    "prefixed",
    "run_cli",
    "save_converted",
    "text_config_tokens",
]
