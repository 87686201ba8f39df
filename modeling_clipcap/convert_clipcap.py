"""Convert original ClipCap checkpoints (Mokady et al., 2021) to `ClipCapForCaptioning`.

The `.pt` files of github.com/rmokady/CLIP_prefix_caption (e.g. `coco_weights.pt`,
`transformer_weights.pt`) are `ClipCaptionModel` state dicts: GPT-2 under `gpt.*`
(`GPT2LMHeadModel` keys, with the `attn.bias`/`attn.masked_bias` buffers of the transformers
version of the time) and the mapper under `clip_project.*`, either the MLP (`model.0` → Tanh →
`model.2`, the mapper "No Detail Left Behind" keeps, paper Sec. 4.1) or the transformer mapper
(`linear`, `prefix_const`, `transformer.layers.{i}`: 8 heads, ReLU feed-forward of ratio 2). They
hold no CLIP weights: ClipCap ran CLIP separately, so the vision tower and projection are taken from
`--clip` (a transformers CLIP checkpoint, by default `openai/clip-vit-base-patch32`, the ViT-B/32
that ClipCap's COCO/Conceptual weights were trained on).

The converted model keeps ClipCap's own decoding rules (`predict.py` `generate2`/`generate_beam`):
a caption ends at the exact "." token (not at any token containing ".", nor at end-of-text, which
ClipCap never trained on) or after 67 tokens; the processor preprocesses with OpenAI CLIP's own
transform (`clip.load`) and decodes with 4.x's clean-up of tokenisation spaces.

Usage::

    python -m modeling_clipcap.convert_clipcap coco_weights.pt clipcap-coco
    python -m modeling_clipcap.convert_clipcap transformer_weights.pt clipcap-tf --clip openai/clip-vit-base-patch32
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

from .configuration_clipcap import ClipCapConfig
from .conversion_utils import (
    DTYPES,
    WEIGHT_FILE_NAMES,
    ConversionError,
    SourceTensors,
    add_common_arguments,
    build_processor,
    check_out_dir,
    convert_gpt2,
    convert_mapper,
    fill_model,
    find_weights_file,
    load_state_dict,
    load_tokenizer,
    prefixed,
    run_cli,
    save_converted,
    text_config_tokens,
)
from .modeling_clipcap import ClipCapForCaptioning

logger = logging.getLogger(__name__)

GPT_PREFIX, MAPPER_PREFIX = "gpt.", "clip_project."
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
# ClipCap's `generate2` / `generate_beam` (predict.py): stop at this token, at most this many tokens.
CLIPCAP_STOP_TOKEN, CLIPCAP_ENTRY_LENGTH = ".", 67


def clipcap_stop_token_ids(tokenizer) -> list[int]:
    """ClipCap's stop rule: the id of the exact "." token (`tokenizer.encode(stop_token)[0]`)."""
    ids = tokenizer.encode(CLIPCAP_STOP_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ConversionError(f"The tokenizer encodes {CLIPCAP_STOP_TOKEN!r} as {ids}, not one token; ClipCap's stop "
                              "rule needs a GPT-2 tokenizer (--tokenizer).")
    return ids


def load_clip_vision(name_or_path: str) -> CLIPVisionModelWithProjection:
    """The vision tower + projection of a transformers CLIP checkpoint (a full `CLIPModel` or a
    `CLIPVisionModelWithProjection`). The projection size of a full CLIP lives in its top-level
    config, so the vision config is rebuilt with it."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as err:  # OSError / ValueError / hub errors
        raise ConversionError(f"Could not load the CLIP checkpoint {name_or_path!r} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}). Pass --clip with a transformers "
                              "CLIP id or folder.") from err
    if config.model_type == "clip":
        vision_config = CLIPVisionConfig(**{**config.vision_config.to_dict(), "projection_dim": config.projection_dim})
    elif config.model_type == "clip_vision_model":
        vision_config = config
    else:
        raise ConversionError(f"--clip {name_or_path!r} is a {config.model_type!r} checkpoint, not a CLIP one.")
    vision, info = CLIPVisionModelWithProjection.from_pretrained(name_or_path, config=vision_config,
                                                                 output_loading_info=True)
    missing = info.get("missing_keys") or []
    if missing or info.get("mismatched_keys"):
        raise ConversionError(f"--clip {name_or_path!r} lacks vision weights: missing {sorted(missing)[:10]}, "
                              f"mismatched {list(info.get('mismatched_keys') or [])[:10]}.")
    return vision.float().eval()


def check_layout(state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Fail early (before loading CLIP) on a state dict that is not ClipCap's `gpt.*` + `clip_project.*`."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state_dict)

    if not has(GPT_PREFIX) or not has(MAPPER_PREFIX):
        sample = ", ".join(list(state_dict)[:6])
        hint = " It looks like the NDLB release: use convert_ndlb." if has("clipcap.") else ""
        raise ConversionError(f"{origin} is not an original ClipCap checkpoint (expected gpt.* and clip_project.* "
                              f"keys; found {sample}, ...).{hint}")


def convert_clipcap_state_dict(
    state_dict: dict[str, torch.Tensor],
    vision: CLIPVisionModelWithProjection,
    tokenizer,
    text_heads: int | None = None,
    mapper_heads: int | None = None,
    origin: str = "ClipCap checkpoint",
) -> ClipCapForCaptioning:
    """A `ClipCapForCaptioning` (eval mode, float32) from ClipCap's `gpt.*`/`clip_project.*` state dict
    and a CLIP vision tower with projection."""
    check_layout(state_dict, origin)
    src = SourceTensors(state_dict, origin)
    text_kwargs, gpt = convert_gpt2(src, GPT_PREFIX, num_heads=text_heads)
    mapper_kwargs, mapper = convert_mapper(src, MAPPER_PREFIX, text_kwargs["n_embd"], mapper_heads)
    src.check_all_used()
    vision_config = vision.config
    if mapper_kwargs["clip_embed_dim"] != vision_config.projection_dim:
        raise ConversionError(f"{origin}: the mapper takes {mapper_kwargs['clip_embed_dim']}-d image embeddings but "
                              f"the --clip model gives {vision_config.projection_dim}-d ones; pass the CLIP the "
                              "checkpoint was trained with (ViT-B/32: 512-d).")

    text_kwargs.update(text_config_tokens(tokenizer, text_kwargs["vocab_size"], origin))
    stop_ids = clipcap_stop_token_ids(tokenizer)
    config = ClipCapConfig(vision_config=vision_config.to_dict(), text_config=text_kwargs, stop_token_ids=stop_ids,
                           **mapper_kwargs)
    model = ClipCapForCaptioning(config)
    tensors = {**prefixed("vision_model.", vision.state_dict()), **prefixed("language_model.", gpt), **mapper}
    fill_model(model, tensors, origin)
    model.generation_config.eos_token_id = stop_ids  # ClipCap does not stop at end-of-text
    model.generation_config.max_new_tokens = CLIPCAP_ENTRY_LENGTH
    logger.info("%s: %s; vocabulary %d, prefix %d, %s mapper, CLIP %dpx/%d.", origin, src.summary(),
                text_kwargs["vocab_size"], config.prefix_length, config.mapping_type, vision_config.image_size,
                vision_config.patch_size)
    return model.eval()


def convert_clipcap(
    src: str | Path,
    out_dir: str | Path,
    clip: str = DEFAULT_CLIP,
    tokenizer: str = "gpt2",
    dtype: str = "float32",
    text_heads: int | None = None,
    mapper_heads: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert the ClipCap checkpoint `src` (a `.pt`/`.bin`/`.safetensors` file or a folder holding
    one) with the CLIP tower of `clip`, and save model + processor to `out_dir`."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    path = Path(src)
    if not path.exists():
        raise ConversionError(f"{src} does not exist (expected a ClipCap .pt file or a folder holding one).")
    weights = find_weights_file(path, WEIGHT_FILE_NAMES, ("*.pt", "*.pth")) if path.is_dir() else path
    state_dict = load_state_dict(weights)
    check_layout(state_dict, str(weights))
    tok = load_tokenizer(tokenizer)
    vision = load_clip_vision(clip)
    model = convert_clipcap_state_dict(state_dict, vision, tok, text_heads, mapper_heads, origin=str(weights))
    model.to(DTYPES[dtype])
    processor = build_processor(model.config.vision_config.image_size, tok)
    return save_converted(model, processor, out_dir, overwrite)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_clipcap.convert_clipcap",
        description="Convert an original ClipCap checkpoint (rmokady/CLIP_prefix_caption .pt: gpt.* + clip_project.*, "
                    "MLP or transformer mapper) plus a CLIP vision tower to a ClipCapForCaptioning folder.",
    )
    parser.add_argument("src", metavar="SRC", help="ClipCap .pt / .bin / .safetensors file, or a folder holding one")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder")
    parser.add_argument("--clip", default=DEFAULT_CLIP,
                        help="transformers CLIP checkpoint id or folder for the vision tower "
                             f"(default: {DEFAULT_CLIP}).")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda a: convert_clipcap(a.src, a.out_dir, a.clip, a.tokenizer, a.dtype, a.text_heads,
                                             a.mapper_heads, a.overwrite), args)


__all__ = [
    "CLIPCAP_ENTRY_LENGTH",
    "CLIPCAP_STOP_TOKEN",
    "check_layout",
    "clipcap_stop_token_ids",
    "convert_clipcap",
    "convert_clipcap_state_dict",
    "load_clip_vision",
    "main",
]

if __name__ == "__main__":
    raise SystemExit(main())
