"""ClipCap processor: CLIP image processor + GPT-2 tokenizer.

Captions are tokenised with an end-of-text token appended and padded with the pad token; the
labels mask padding with -100 from the attention mask. (The original ClipCap padded with token
id 0, which in GPT-2's vocabulary is "!", and could not tell padding from real text.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency is composited on white; CMYK, greyscale, palette,
    16-bit and float images are converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        span = float(array.max() - array.min()) or 1.0
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def caption_stop_token_ids(tokenizer) -> list[int]:
    """Ids of every token whose string contains "." (the authors' caption stop rule)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [i for i, tok in enumerate(tokens) if tok is not None and "." in tok]


class ClipCapProcessor(ProcessorMixin):
    r"""
    Prepares images and captions for [`ClipCapForCaptioning`].

    Args:
        image_processor (`CLIPImageProcessor`):
            Resizes, crops and normalises images as CLIP expects.
        tokenizer (`GPT2Tokenizer`):
            The GPT-2 tokenizer of the language model. Its pad token is set to its eos token if
            missing.
    """

    def __init__(self, image_processor, tokenizer):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        super().__init__(image_processor, tokenizer)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = "longest",
        truncation: bool = True,
        max_length: int | None = None,
        add_eos: bool = True,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images: a PIL image, an array, or a list of them. Any PIL mode is accepted.
            text: captions for teacher forcing (training), one per image.
            add_eos: append the end-of-text token so that the model learns to stop.
            max_length: truncate captions to this many tokens (the eos included).

        Returns:
            `BatchFeature` with `pixel_values` (when images are given) and `input_ids`,
            `attention_mask`, `labels` (when text is given; labels are -100 on padding).
        """
        if images is None and text is None:
            raise ValueError("Pass `images`, `text`, or both.")
        data: dict[str, Any] = {}
        if images is not None:
            if not isinstance(images, (list, tuple)):
                images = [images]
            images = [to_rgb(im) if isinstance(im, Image.Image) else im for im in images]
            pixel = self.image_processor(images=images, return_tensors="pt", **kwargs)
            data["pixel_values"] = pixel["pixel_values"]
        if text is not None:
            if isinstance(text, str):
                text = [text]
            eos = self.tokenizer.eos_token if add_eos else ""
            encoded = self.tokenizer(
                [t.strip() + eos for t in text],
                padding=padding,
                truncation=truncation and max_length is not None,
                max_length=max_length,
                return_tensors="pt",
            )
            data["input_ids"] = encoded["input_ids"]
            data["attention_mask"] = encoded["attention_mask"]
            data["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        batch = BatchFeature(data, tensor_type="pt")
        if return_tensors is None:
            return BatchFeature({k: v.tolist() for k, v in batch.items()})
        return batch

    def batch_decode(self, token_ids: torch.Tensor | list, **kwargs) -> list[str]:
        """Captions from generated token ids (special tokens removed, whitespace stripped)."""
        kwargs.setdefault("skip_special_tokens", True)
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, **kwargs)]

    def decode(self, token_ids: torch.Tensor | list, **kwargs) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(token_ids, **kwargs).strip()

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]


__all__ = ["ClipCapProcessor", "caption_stop_token_ids", "to_rgb"]
