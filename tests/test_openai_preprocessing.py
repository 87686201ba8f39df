"""Pixel values equal to OpenAI CLIP's own preprocessing (`clip.load(...)[1]`: torchvision
`Resize(n, bicubic)` + `CenterCrop(n)` + RGB + normalise), which the authors' release, the
original ClipCap and the paper's CLIP judge used (issue 15, sec. 2): the converters' processor
(`ClipCapProcessor(openai_clip_transform=True)`) and the CLIP judge standing in for OpenAI CLIP
(`ClipJudge.from_pretrained(..., openai_preprocessing=True)`, the default for `openai/clip-*`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from metrics.clip_judge import ClipJudge
from modeling_clipcap import ClipCapProcessor
from modeling_clipcap.conversion_utils import build_image_processor

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZES = [(640, 427), (427, 640), (641, 427), (500, 333), (333, 500), (225, 224), (299, 299)]  # (width, height)


def openai_transform(size: int):
    """clip/clip.py `_transform(n_px)`, written out."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(MEAN, STD)])


def noise_images(sizes, seed: int = 0, mode: str = "RGB") -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode) for w, h in sizes]


@pytest.fixture(scope="module")
def processor(tokenizer):
    return ClipCapProcessor(build_image_processor(224), tokenizer, openai_clip_transform=True)


def test_processor_pixels_equal_openai_clip(processor):
    images = noise_images(SIZES) + noise_images([(321, 219)], seed=1, mode="L")  # a greyscale one too
    ours = processor(images=images)["pixel_values"]
    theirs = torch.stack([openai_transform(224)(im) for im in images])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    arrays = processor(images=[np.asarray(im) for im in images[:2]])["pixel_values"]  # uint8 HWC arrays
    torch.testing.assert_close(arrays, theirs[:2], atol=1e-6, rtol=0)


def test_640x427_is_cropped_at_column_56(processor):
    """The issue's case: resized to 335 x 224, OpenAI crops at round(55.5) = 56; transformers'
    CLIP image processor at 55."""
    image = noise_images([(640, 427)], seed=2)[0]
    resized = image.resize((335, 224), Image.BICUBIC)
    crop = lambda left: T.Normalize(MEAN, STD)(TF.to_tensor(resized.crop((left, 0, left + 224, 224))))  # noqa: E731
    ours = processor(images=image)["pixel_values"][0]
    torch.testing.assert_close(ours, crop(56), atol=1e-6, rtol=0)
    assert (ours - crop(55)).abs().max() > 0.1
    plain = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    assert (plain - crop(56)).abs().max() > 0.1  # what the processor alone gives is not OpenAI's


def test_processor_option_errors(processor):
    with pytest.raises(TypeError, match="uint8"):
        processor(images=np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="do not apply"):
        processor(images=noise_images([(30, 20)]), do_center_crop=False)


def test_openai_clip_judge_preprocesses_as_openai(tiny_clip_judge_dir):
    images = noise_images([(61, 41), (41, 61), (45, 31), (97, 40)], seed=3)
    judge = ClipJudge.from_pretrained(str(tiny_clip_judge_dir), openai_preprocessing=True)
    theirs = torch.stack([openai_transform(32)(im) for im in images])
    torch.testing.assert_close(judge._backend.preprocess(images), theirs, atol=1e-6, rtol=0)
    assert judge.cache_key.endswith("|openai-transform")  # cached embeddings of the other transform are not reused
    plain = ClipJudge.from_pretrained(str(tiny_clip_judge_dir))  # a local folder keeps its own image processor
    assert (plain._backend.preprocess(images) - theirs).abs().max() > 0.1
    assert not plain.cache_key.endswith("|openai-transform")
