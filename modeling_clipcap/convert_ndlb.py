"""Convert the authors' "No Detail Left Behind" release (`manu-gaur/NDLB`) to `ClipCapForCaptioning`.

The release (paper Sec. 4.1: CLIP ViT-B/32 → Tanh MLP 512 → 3840 → 7680 → 10 prefix tokens →
GPT-2; code: github.com/manugaurdl/nldb_hf_hosting, `model.py`) is a `huggingface_hub`
`PyTorchModelHubMixin` folder: `model.safetensors` + `config.json` (the mixin's init kwargs, e.g.
`{"clip_model": "ViT-B/32", "beam_size": 5, "max_len": 50, ...}`). Its state dict holds

- `clip.*`: a full OpenAI-layout CLIP. The vision tower `clip.visual.*` and its projection
  `clip.visual.proj` are kept; the text tower (`clip.transformer.*`, `clip.token_embedding.*`,
  `clip.positional_embedding`, `clip.ln_final.*`, `clip.text_projection`, `clip.logit_scale`) is
  dropped.
- `clipcap.gpt.*`: GPT-2, "patched" for their decoding trick (`maybe_patch_gpt`): the embedding
  table has extra rows (32 × 10 for their batch size 32 and 10 prefix tokens) into which they write
  the prefix, and `clipcap.gpt.lm_head.bias` is 0 on the real vocabulary and -inf on the extra
  rows. The real vocabulary size is read off that bias (the -inf tail); the extra rows are
  dropped and the bias over the real vocabulary becomes our `logits_bias` (`lm_head_bias=True`).
  `lm_head.weight` may be absent (tied; safetensors keeps one name per shared tensor).
- `clipcap.clip_project.model.{0,2}.*`: the MLP mapper.

The converted model decodes as the release did under the transformers 4.29 it pins:
`length_normalization="with_prefix"` (beam ranking by sum log-prob / (10 prefix positions +
caption tokens), end-of-text forced after a stop token), OpenAI CLIP's own image transform in the
processor, and decoded text with tokenisation spaces cleaned up (`clean_up_tokenization_spaces=True`
in their `batch_decode`). `--length-normalization generated` gives transformers 5's ranking instead.

`ensure_converted(name_or_path)` (used by `inference.py`) passes our own folders/repos through and
converts a release once into a cache folder.

Usage::

    python -m modeling_clipcap.convert_ndlb manu-gaur/NDLB ndlb-clipcap
    python -m modeling_clipcap.convert_ndlb path/to/release_folder ndlb-clipcap --tokenizer gpt2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .configuration_clipcap import ClipCapConfig
from .conversion_utils import (
    DTYPES,
    ConversionError,
    SourceTensors,
    add_common_arguments,
    build_processor,
    check_out_dir,
    convert_gpt2,
    convert_mapper,
    convert_openai_clip_vision,
    fill_model,
    find_weights_file,
    load_state_dict,
    load_tokenizer,
    prefixed,
    run_cli,
    save_converted,
    text_config_tokens,
)
from .configuration_clipcap import LENGTH_NORMALIZATIONS
from .modeling_clipcap import ClipCapForCaptioning
from .processing_clipcap import caption_stop_token_ids

logger = logging.getLogger(__name__)

CLIP_PREFIX, VISION_PREFIX, GPT_PREFIX, MAPPER_PREFIX = "clip.", "clip.visual.", "clipcap.gpt.", "clipcap.clip_project."
# OpenAI CLIP text tower (and JIT-archive metadata) entries: not part of a captioner.
# Keys of the mixin's config.json (ClipCapSender's init kwargs) that mark the release layout.
RELEASE_CONFIG_KEYS = {"clip_model", "clipcap_path", "official_clipcap_weights", "best_model_path", "train_method"}
CLIP_TEXT_KEYS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection",
                  "logit_scale", "input_resolution", "context_length", "vocab_size")
# Part of `ensure_converted`'s cache key: bump when converted folders change (2: the release's beam
# ranking, OpenAI CLIP's image transform, 4.x decoded text).
CONVERTED_FORMAT = 2


def real_vocab_size(bias: torch.Tensor, origin: str) -> int:
    """Rows before the -inf tail of the authors' lm_head bias: the real vocabulary."""
    if bias.ndim != 1:
        raise ConversionError(f"{origin}: {GPT_PREFIX}lm_head.bias has shape {tuple(bias.shape)}, expected a vector.")
    extra = torch.isneginf(bias)
    n = int(extra.numel() - extra.flip(0).int().cumprod(0).sum())  # length before the trailing -inf run
    if extra[:n].any() or not torch.isfinite(bias[:n]).all():
        raise ConversionError(f"{origin}: {GPT_PREFIX}lm_head.bias has -inf/nan entries inside the vocabulary (rows "
                              f"< {n}); expected finite values followed by a -inf tail for the extra prefix rows.")
    if n == 0:
        raise ConversionError(f"{origin}: {GPT_PREFIX}lm_head.bias is -inf everywhere.")
    return n


def generation_defaults(release_config: dict[str, Any], prefix_length: int) -> dict[str, Any]:
    """Generation settings from the mixin's config.json (`beam_size`, `max_len` counting the prefix
    positions, `do_sample`)."""
    out: dict[str, Any] = {}
    if isinstance(release_config.get("beam_size"), int) and release_config["beam_size"] > 0:
        out["num_beams"] = release_config["beam_size"]
    if isinstance(release_config.get("max_len"), int) and release_config["max_len"] > prefix_length:
        out["max_new_tokens"] = release_config["max_len"] - prefix_length
    if isinstance(release_config.get("do_sample"), bool):
        out["do_sample"] = release_config["do_sample"]
    return out


def convert_ndlb_state_dict(
    state_dict: dict[str, torch.Tensor],
    tokenizer,
    release_config: dict[str, Any] | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    mapper_heads: int | None = None,
    origin: str = "NDLB checkpoint",
    length_normalization: str = "with_prefix",
) -> ClipCapForCaptioning:
    """A `ClipCapForCaptioning` (eval mode, float32) holding the weights of the authors' state dict,
    ranking beams as the release did under transformers 4.29 unless `length_normalization="generated"`."""
    src = SourceTensors(state_dict, origin)
    if not src.keys_with_prefix(VISION_PREFIX) or not src.keys_with_prefix(GPT_PREFIX):
        sample = ", ".join(list(state_dict)[:6])
        raise ConversionError(f"{origin} is not in the NDLB release layout (expected clip.visual.* and clipcap.gpt.* "
                              f"keys; found {sample}, ...). Original ClipCap .pt files go to convert_clipcap.")
    vision_config, vision = convert_openai_clip_vision(src, VISION_PREFIX, vision_heads)
    src.ignore(lambda k: k.startswith(CLIP_PREFIX) and k[len(CLIP_PREFIX):].startswith(CLIP_TEXT_KEYS),
               "CLIP text-tower tensors")

    bias = src.take_optional(GPT_PREFIX + "lm_head.bias")
    vocab = real_vocab_size(bias, origin) if bias is not None else None
    text_kwargs, gpt = convert_gpt2(src, GPT_PREFIX, vocab_size=vocab, num_heads=text_heads)
    embeddings = state_dict.get(GPT_PREFIX + "transformer.wte.weight", state_dict.get(GPT_PREFIX + "lm_head.weight"))
    rows = embeddings.shape[0]
    if bias is not None and bias.shape[0] != rows:
        raise ConversionError(f"{origin}: {GPT_PREFIX}lm_head.bias has {bias.shape[0]} entries but the embeddings "
                              f"{rows} rows.")
    mapper_kwargs, mapper = convert_mapper(src, MAPPER_PREFIX, text_kwargs["n_embd"], mapper_heads)
    if mapper_kwargs["clip_embed_dim"] != vision_config.projection_dim:
        raise ConversionError(f"{origin}: the mapper takes {mapper_kwargs['clip_embed_dim']}-d image embeddings but "
                              f"the CLIP projection gives {vision_config.projection_dim}-d ones.")
    src.check_all_used()

    vocab = text_kwargs["vocab_size"]
    text_kwargs.update(text_config_tokens(tokenizer, vocab, origin))
    config = ClipCapConfig(
        vision_config=vision_config.to_dict(), text_config=text_kwargs, lm_head_bias=bias is not None,
        stop_token_ids=caption_stop_token_ids(tokenizer), length_normalization=length_normalization, **mapper_kwargs,
    )
    model = ClipCapForCaptioning(config)
    tensors = {**prefixed("vision_model.", vision), **prefixed("language_model.", gpt), **mapper}
    if bias is not None:
        tensors["logits_bias"] = bias[:vocab]
    fill_model(model, tensors, origin)
    for key, value in generation_defaults(release_config or {}, config.prefix_length).items():
        setattr(model.generation_config, key, value)
    logger.info("%s: %s; dropped %d extra embedding rows; vocabulary %d, prefix %d, %s mapper, CLIP %dpx/%d.",
                origin, src.summary(), rows - vocab, vocab, config.prefix_length, config.mapping_type,
                vision_config.image_size, vision_config.patch_size)
    return model.eval()


def resolve_source(src: str) -> Path:
    """A local release folder (or weights file), or a Hub repo id downloaded with `snapshot_download`."""
    path = Path(src)
    if path.exists():
        return path
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise ConversionError(f"{src} is neither an existing folder/file nor a Hub repo id (owner/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=src, allow_patterns=["*.safetensors", "*.bin", "*.json"]))
    except Exception as err:  # hub errors (offline, not found, gated...) all end here
        raise ConversionError(f"Could not download {src!r} from the Hub ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}).") from err


def read_release_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        logger.warning("Ignoring unreadable %s (%s).", path, err)
        return {}
    return config if isinstance(config, dict) else {}


def convert_ndlb(
    src: str | Path,
    out_dir: str | Path,
    tokenizer: str = "gpt2",
    dtype: str = "float32",
    vision_heads: int | None = None,
    text_heads: int | None = None,
    mapper_heads: int | None = None,
    overwrite: bool = False,
    length_normalization: str = "with_prefix",
) -> Path:
    """Convert the release at `src` (folder, weights file or Hub repo id) and save the model and
    processor to `out_dir` (loadable with `ClipCapForCaptioning.from_pretrained` /
    `AutoModel.from_pretrained(out_dir, trust_remote_code=True)` / `AutoProcessor`)."""
    if length_normalization not in LENGTH_NORMALIZATIONS:
        raise ConversionError(f"length_normalization must be one of {LENGTH_NORMALIZATIONS}, got "
                              f"{length_normalization!r}.")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    path = resolve_source(str(src))
    weights = find_weights_file(path) if path.is_dir() else path
    release_config = read_release_config(weights.parent)
    tok = load_tokenizer(tokenizer)
    model = convert_ndlb_state_dict(load_state_dict(weights), tok, release_config, vision_heads, text_heads,
                                    mapper_heads, origin=str(weights), length_normalization=length_normalization)
    model.to(DTYPES[dtype])
    processor = build_processor(model.config.vision_config.image_size, tok)
    return save_converted(model, processor, out_dir, overwrite)


def is_release_folder(folder: Path) -> bool:
    """Whether `folder` holds the authors' release (mixin config.json, or `clipcap.gpt.*` weights)
    rather than a transformers folder."""
    config = read_release_config(folder)
    if config.get("model_type") is not None:
        return False
    if RELEASE_CONFIG_KEYS & set(config):
        return True
    weights = folder / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), "pt") as f:
                return any(k.startswith(GPT_PREFIX) for k in f.keys())
        except Exception:  # unreadable: not ours to judge here, from_pretrained will report it
            return False
    return False


def converted_cache_dir() -> Path:
    """Where `ensure_converted` keeps converted releases: $NDLB_CONVERTED_CACHE, else under HF_HOME."""
    from huggingface_hub import constants

    return Path(os.environ.get("NDLB_CONVERTED_CACHE") or Path(constants.HF_HOME) / "ndlb_converted")


def ensure_converted(name_or_path: str | Path, cache_dir: str | Path | None = None, **convert_kwargs) -> str:
    """`name_or_path` itself when it is a transformers ClipCap folder or Hub repo; when it is in the
    authors' release layout, the folder of its conversion (made once, then reused from `cache_dir`).

    A tokenizer saved inside the release folder is used; otherwise `convert_kwargs["tokenizer"]`
    (default `gpt2`). Other `convert_kwargs` go to [`convert_ndlb`] (e.g. `vision_heads`)."""
    name = str(name_or_path)
    path = Path(name)
    if not path.exists():
        if name.count("/") != 1:
            return name
        from huggingface_hub import hf_hub_download

        try:
            config = json.loads(Path(hf_hub_download(name, "config.json")).read_text())
        except Exception:  # offline / not found / no config: let from_pretrained report the problem
            return name
        if config.get("model_type") is not None or not RELEASE_CONFIG_KEYS & set(config):
            return name
        path = resolve_source(name)
    if path.is_dir() and not is_release_folder(path):
        return name
    weights = find_weights_file(path) if path.is_dir() else path
    stat = weights.stat()
    fingerprint = (f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|format {CONVERTED_FORMAT}|"
                   f"{sorted(convert_kwargs.items())}")
    key = hashlib.sha1(fingerprint.encode()).hexdigest()[:16]
    out = Path(cache_dir) if cache_dir is not None else converted_cache_dir()
    out = out / key
    if not (out / "config.json").is_file():
        if (weights.parent / "tokenizer_config.json").is_file():
            convert_kwargs.setdefault("tokenizer", str(weights.parent))
        logger.info("Converting the release at %s to %s (once).", weights, out)
        convert_ndlb(weights, out, overwrite=True, **convert_kwargs)
    return str(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_clipcap.convert_ndlb",
        description="Convert the authors' NDLB release (manu-gaur/NDLB: model.safetensors + config.json) to a "
                    "ClipCapForCaptioning folder with processor files and remote code.",
    )
    parser.add_argument("src", metavar="SRC",
                        help="release folder, its weights file, or a Hub repo id (manu-gaur/NDLB)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder")
    parser.add_argument("--vision-heads", type=int, default=None,
                        help="CLIP vision attention heads (default: width / 64).")
    parser.add_argument("--length-normalization", choices=LENGTH_NORMALIZATIONS, default="with_prefix",
                        help="beam ranking of the converted model: with_prefix (default: as the release ran under "
                             "transformers 4.29, sum log-prob / (prefix + caption tokens)) or generated "
                             "(transformers 5: / caption tokens).")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda a: convert_ndlb(a.src, a.out_dir, a.tokenizer, a.dtype, a.vision_heads, a.text_heads,
                                          a.mapper_heads, a.overwrite, a.length_normalization), args)


__all__ = [
    "convert_ndlb",
    "convert_ndlb_state_dict",
    "ensure_converted",
    "is_release_folder",
    "main",
    "real_vocab_size",
]

if __name__ == "__main__":
    raise SystemExit(main())
