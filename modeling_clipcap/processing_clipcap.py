"""ClipCap processor: CLIP image processor + GPT-2 tokenizer.

Captions are tokenised with an end-of-text token appended and padded with the pad token; the
labels mask padding with -100 from the attention mask. (The original ClipCap padded with token
id 0, which in GPT-2's vocabulary is "!", and could not tell padding from real text.)

With ``openai_clip_transform=True`` (set by the converters) images go through OpenAI CLIP's own
transform, the `clip.load(...)[1]` that the authors' release and the original ClipCap used:
torchvision `Resize` (bicubic, short side, on the PIL image) → `CenterCrop` (offset rounded, where
transformers' CLIP image processor rounds it down: a 640x427 image is cropped at column 56, not 55)
→ RGB → `ToTensor` → normalise. Pixel values then equal OpenAI's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from .image_loading import to_rgb  # the one conversion (transparency on white), shared with the judge


def caption_stop_token_ids(tokenizer) -> list[int]:
    """Ids of every token whose string contains "." (the authors' caption stop rule)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [i for i, tok in enumerate(tokens) if tok is not None and "." in tok]


def openai_clip_transform(image_processor):
    """OpenAI CLIP's eval transform (`clip/clip.py` `_transform`) with the sizes, mean and std of a
    CLIP `image_processor`: a callable from a PIL image to a (3, H, W) float tensor."""
    from torchvision import transforms as T

    size, crop = image_processor.size, image_processor.crop_size  # dicts or SizeDicts
    short, crop = size.get("shortest_edge"), (crop.get("height"), crop.get("width"))
    if short is None:
        raise ValueError(f"openai_clip_transform needs an image processor that resizes the short side "
                         f"(size={{'shortest_edge': N}}), got size={size!r}.")
    return T.Compose([
        T.Resize(short, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(crop),
        lambda image: image.convert("RGB"),
        T.ToTensor(),
        T.Normalize(list(image_processor.image_mean), list(image_processor.image_std)),
    ])


class ClipCapProcessor(ProcessorMixin):
    r"""
    Prepares images and captions for [`ClipCapForCaptioning`].

    Args:
        image_processor (`CLIPImageProcessor`):
            Resizes, crops and normalises images as CLIP expects.
        tokenizer (`GPT2Tokenizer`):
            The GPT-2 tokenizer of the language model. Its pad token is set to its eos token if
            missing.
        openai_clip_transform (`bool`, *optional*, defaults to `False`):
            Preprocess images with OpenAI CLIP's own transform (sizes, mean and std from
            `image_processor`) instead of `image_processor` itself, so that pixel values equal
            `clip.load(...)[1]`'s (see the module docstring). The converters of the authors' release
            and of the original ClipCap set it; PIL images (or uint8 HWC arrays) only.
    """

    def __init__(self, image_processor, tokenizer, openai_clip_transform: bool = False):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.openai_clip_transform = bool(openai_clip_transform)
        self._openai_transform = None
        super().__init__(image_processor, tokenizer)

    def _openai_pixel_values(self, images: list, kwargs: dict[str, Any]) -> torch.Tensor:
        """OpenAI CLIP's transform on each image: (B, 3, H, W)."""
        if kwargs:
            raise ValueError(f"Image-processor arguments {sorted(kwargs)} do not apply with openai_clip_transform=True "
                             "(sizes, mean and std come from the saved image processor).")
        if self._openai_transform is None:
            self._openai_transform = openai_clip_transform(self.image_processor)
        pils = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                array = np.asarray(image)
                if array.dtype != np.uint8 or array.ndim not in (2, 3):
                    raise TypeError(f"images[{i}]: openai_clip_transform takes PIL images or uint8 HWC arrays, got "
                                    f"{type(image).__name__} {getattr(array, 'dtype', '')} "
                                    f"{getattr(array, 'shape', '')}.")
                image = Image.fromarray(array)
            pils.append(to_rgb(image))  # as every other path: transparency on white
        return torch.stack([self._openai_transform(image) for image in pils])

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
            if self.openai_clip_transform:
                data["pixel_values"] = self._openai_pixel_values(list(images), kwargs)
            else:
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


__all__ = ["ClipCapProcessor", "caption_stop_token_ids", "openai_clip_transform"]
