"""The "image-to-text" pipeline (modeling_clipcap/pipeline_clipcap.py): same captions as
`model.generate` on the processor's pixels, for every input form (PIL image, path, URL, list,
tuple, `images=`), generation arguments at construction, per call and in `generate_kwargs`,
batching and several returned sequences. The fresh-process (remote code) check of a published
folder is in tests/test_publish.py."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_clipcap import ClipCapCaptioningPipeline
from modeling_clipcap.pipeline_clipcap import TASK, custom_pipelines_entry
from tests import tiny


def perturbed_clipcap(tokenizer, seed: int = 0):
    """A tiny ClipCap whose captions differ from image to image (random init alone gives nearly
    the same caption for every image): noise on every weight, strong on the mapper."""
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (1.0 if name.startswith("mapper") else 0.3))
    return model.eval(), processor


def distinct_images() -> list[Image.Image]:
    """Images whose captions differ under `perturbed_clipcap` (one RGBA, to exercise to_rgb)."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 250)]
    images = [Image.new("RGB", (40, 40), c) for c in colours] + tiny.random_images(1, seed=3)
    images.append(Image.new("RGBA", (36, 44), (10, 200, 30, 90)))
    return images


def reference(model, processor, images, **generate_kwargs) -> list[str]:
    pixel_values = processor(images=images)["pixel_values"]
    return processor.batch_decode(model.generate(pixel_values=pixel_values, **generate_kwargs))


@pytest.fixture(scope="module")
def captioner(tokenizer):
    model, processor = perturbed_clipcap(tokenizer)
    pipe = ClipCapCaptioningPipeline(model=model, processor=processor, device="cpu", max_new_tokens=5, num_beams=2)
    return pipe, model, processor


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(distinct_images()):
        paths.append(str(folder / f"im{i}.png"))
        image.save(paths[-1])
    return paths


def test_registered_task_and_config_entry():
    from transformers.pipelines import PIPELINE_REGISTRY

    assert PIPELINE_REGISTRY.supported_tasks[TASK]["impl"] is ClipCapCaptioningPipeline
    assert custom_pipelines_entry() == {TASK: {"impl": "pipeline_clipcap.ClipCapCaptioningPipeline",
                                               "pt": ["AutoModel"], "type": "multimodal"}}


def test_captions_equal_generate_for_every_input_form(captioner, image_files):
    pipe, model, processor = captioner
    images = [Image.open(p) for p in image_files]
    expected = reference(model, processor, images, max_new_tokens=5, num_beams=2)
    assert len(set(expected)) >= 4, expected  # the comparison must be able to fail
    assert isinstance(pipe, ClipCapCaptioningPipeline) and pipe.task == TASK
    # one image (PIL, path) -> [{"generated_text": ...}]
    assert pipe(images[0]) == [{"generated_text": expected[0]}]
    assert pipe(image_files[1]) == [{"generated_text": expected[1]}]
    assert pipe(images=image_files[2]) == [{"generated_text": expected[2]}]
    # a list (or tuple) -> one list per image, with and without batching
    for batch_size in (1, 4):
        out = pipe(image_files, batch_size=batch_size)
        assert out == [[{"generated_text": c}] for c in expected], batch_size
    assert pipe(tuple(images[:2])) == [[{"generated_text": c}] for c in expected[:2]]
    assert pipe([]) == []


def test_generation_arguments_pass_through(captioner, image_files):
    pipe, model, processor = captioner
    images = [Image.open(p) for p in image_files[:3]]
    greedy = reference(model, processor, images, max_new_tokens=4, num_beams=1)
    beams = reference(model, processor, images, max_new_tokens=5, num_beams=2)
    assert greedy != beams
    got = pipe(image_files[:3], num_beams=1, max_new_tokens=4)
    assert [r[0]["generated_text"] for r in got] == greedy
    got = pipe(image_files[:3], generate_kwargs={"num_beams": 1, "max_new_tokens": 4}, batch_size=2)
    assert [r[0]["generated_text"] for r in got] == greedy
    # generate_kwargs given at construction and per call add up
    both = ClipCapCaptioningPipeline(model=model, processor=processor, device="cpu",
                                     generate_kwargs={"max_new_tokens": 4})
    assert [r[0]["generated_text"] for r in both(image_files[:3], generate_kwargs={"num_beams": 1})] == greedy
    # defaults: the arguments given at construction
    assert [r[0]["generated_text"] for r in pipe(image_files[:3])] == beams
    # several returned sequences per image, batched: the beams of each image stay together
    three = reference(model, processor, images, max_new_tokens=5, num_beams=3, num_return_sequences=3)
    out = pipe(image_files[:3], num_beams=3, num_return_sequences=3, batch_size=2)
    assert [[r["generated_text"] for r in per_image] for per_image in out] == [three[0:3], three[3:6], three[6:9]]


def test_url_input_and_overall_deadline(captioner):
    """URLs are read from a real server on 127.0.0.1; one that trickles a byte every 0.5 s fails at
    the call's `timeout` (an overall deadline, not a per-read one)."""
    import base64
    import time

    from tests.slow_server import DripServer

    pipe, model, processor = captioner
    image = distinct_images()[2]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    expected = [{"generated_text": reference(model, processor, [image], max_new_tokens=5, num_beams=2)[0]}]
    with DripServer(files={"/cat.png": buffer.getvalue()}) as server:
        assert pipe(f"{server.url}/cat.png", timeout=3.0) == expected
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"not downloaded within 1\.5 s"):
            pipe(f"{server.url}/slow.png", timeout=1.5)
        assert time.monotonic() - start < 4.0
        size = len(buffer.getvalue())
        with pytest.raises(OSError, match=f"announces {size:,} bytes, more than the limit of {size - 1:,}"):
            pipe(f"{server.url}/cat.png", max_image_bytes=size - 1)
    assert pipe("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()) == expected


def test_clear_errors(captioner, tmp_path):
    pipe, _, _ = captioner
    with pytest.raises(TypeError, match=r"unexpected arguments \['beam_size'\]"):
        pipe(tiny.random_images(1)[0], beam_size=3)
    with pytest.raises(ValueError, match="both directly and in `generate_kwargs`"):
        pipe(tiny.random_images(1)[0], num_beams=2, generate_kwargs={"num_beams": 3})
    with pytest.raises(OSError, match="neither an existing image file nor an http"):
        pipe(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="No image given"):
        pipe()


def test_pipeline_factory_and_save_pretrained_round_trip(captioner, image_files, tmp_path):
    """`pipeline(..., pipeline_class=...)` in the repository, and `save_pretrained` writing a folder
    (config `custom_pipelines`, pipeline file, processor) that `pipeline("image-to-text", folder,
    trust_remote_code=True)` loads as remote code with the same captions."""
    import json

    pipe, model, processor = captioner
    expected = pipe(image_files[:3])
    built = pipeline(TASK, model=model, processor=processor, pipeline_class=ClipCapCaptioningPipeline, device="cpu",
                     max_new_tokens=5, num_beams=2)
    assert built.task == TASK and built(image_files[:3]) == expected
    pipe.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_clipcap.ClipCapCaptioningPipeline"
    assert {"pipeline_clipcap.py", "processor_config.json", "modeling_clipcap.py"} <= {
        p.name for p in (tmp_path / "saved").iterdir()}
    loaded = pipeline(TASK, model=str(tmp_path / "saved"), trust_remote_code=True, device="cpu", max_new_tokens=5,
                      num_beams=2)
    assert type(loaded).__module__.startswith("transformers_modules.")  # the saved copy, not this repo's class
    assert loaded(image_files[:3]) == expected
