"""The one image loader (modeling_clipcap/image_loading.py; issues 16.8 and 17.1).

- Transparent RGBA / LA / P images give the same RGB pixels, composited on white, through every
  path: the captioner (pipeline, inference.py, the processor given a PIL image) and the judge
  (`ClipJudge.embed_images`, `metrics.clip_judge.load_image` as the collators call it).
- URL downloads have an overall deadline and a size cap (a local server that trickles bytes).
- The metrics copies are links to the one file.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_clipcap.image_loading import ImageLoadError, fetch_url, open_image
from tests.slow_server import DripServer

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 200, 0)


def transparent_images() -> dict[str, Image.Image]:
    """RGBA, LA and P images (8 x 8) with fully transparent, half transparent and opaque rows."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:3] = (*RED, 0)  # invisible red
    rgba[3:5] = (*BLUE, 128)  # half-transparent blue
    rgba[5:] = (*GREEN, 255)
    la = np.zeros((8, 8, 2), dtype=np.uint8)
    la[:3], la[3:5], la[5:] = (40, 0), (100, 128), (180, 255)
    p = Image.new("P", (8, 8), 0)
    p.putpalette([*RED, *BLUE, *GREEN] + [0] * (256 - 3) * 3)
    p.paste(1, (0, 3, 8, 5))
    p.paste(2, (0, 5, 8, 8))
    p.info["transparency"] = 0  # palette index 0 (red) is transparent
    return {"RGBA": Image.fromarray(rgba, "RGBA"), "LA": Image.fromarray(la, "LA"), "P": p}


def expected_rgb(mode: str) -> np.ndarray:
    """Composited on white by hand: out = a * colour + (1 - a) * 255."""
    def over_white(colour, alpha):
        a = alpha / 255
        return [round(a * c + (1 - a) * 255) for c in colour]

    rows = {"RGBA": [over_white(RED, 0)] * 3 + [over_white(BLUE, 128)] * 2 + [list(GREEN)] * 3,
            "LA": [over_white((40,) * 3, 0)] * 3 + [over_white((100,) * 3, 128)] * 2 + [[180] * 3] * 3,
            "P": [[255] * 3] * 3 + [list(BLUE)] * 2 + [list(GREEN)] * 3}[mode]
    return np.repeat(np.array(rows, dtype=np.int64)[:, None, :], 8, axis=1)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transparent")
    paths = {}
    for mode, image in transparent_images().items():
        paths[mode] = folder / f"{mode}.png"
        image.save(paths[mode])
        assert Image.open(paths[mode]).mode == mode  # the file keeps its transparency
    return paths


class Spy:
    """Wraps a callable (a processor, a judge's preprocess) and records the images it is given."""

    def __init__(self, wrapped):
        self.wrapped, self.images = wrapped, []

    def __call__(self, *args, **kwargs):
        images = kwargs.get("images", args[0] if args else None)
        self.images += list(images) if isinstance(images, (list, tuple)) else [images]
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image, dtype=np.int64)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_captioner_and_judge_see_the_same_pixels(mode, image_files, tiny_clipcap, tiny_clip_judge_dir):
    import inference
    from metrics.clip_judge import ClipJudge, load_image
    from modeling_clipcap import ClipCapCaptioningPipeline

    path = image_files[mode]
    want = expected_rgb(mode)
    reference = pixels(open_image(path))
    assert np.abs(reference - want).max() <= 1  # on white (PIL rounds the half-transparent row its way)
    assert (reference[:3] == 255).all()  # fully transparent -> white, whatever colour is underneath

    # the captioner: pipeline (path and PIL image), inference.py's loader, the processor on a PIL image
    model, processor = tiny_clipcap
    pipe = ClipCapCaptioningPipeline(model=model, processor=processor, device="cpu")
    spy = Spy(processor)
    pipe.processor = spy
    pipe.preprocess(str(path))
    pipe.preprocess(Image.open(path))
    seen_by_captioner = [pixels(im) for im in spy.images]
    seen_by_captioner.append(pixels(inference.try_load(str(path), timeout=5, max_bytes=10**6)))
    direct = processor(images=[Image.open(path)])["pixel_values"]
    assert direct.equal(processor(images=[Image.fromarray(reference.astype(np.uint8))])["pixel_values"])

    # the judge: embed_images on a path, a datasets bytes dict and a PIL image; load_image (collators)
    judge = ClipJudge.from_pretrained(str(tiny_clip_judge_dir), device="cpu")
    judge_spy = Spy(judge._backend.preprocess)
    judge._backend.preprocess = judge_spy
    judge.embed_images([str(path), {"bytes": path.read_bytes(), "path": None}, Image.open(path)])
    seen_by_judge = [pixels(im) for im in judge_spy.images]
    seen_by_judge.append(pixels(load_image({"bytes": path.read_bytes(), "path": str(path)})))

    assert len(seen_by_captioner) == 3 and len(seen_by_judge) == 4
    for seen in seen_by_captioner + seen_by_judge:
        assert np.array_equal(seen, reference)


def test_other_modes_and_sources(tmp_path):
    """16-bit, CMYK, a colour-key RGB PNG, EXIF orientation, bytes and data: URLs; clear errors."""
    import base64

    wide = Image.fromarray(np.array([[0, 1000], [3000, 65535]], dtype=np.uint16))
    assert pixels(open_image(wide))[..., 0].tolist() == [[0, 3], [11, 255]]  # min-max scaled, truncated
    assert pixels(open_image(Image.new("CMYK", (2, 2), (0, 0, 0, 0)))).tolist() == [[[255] * 3] * 2] * 2
    keyed = Image.new("RGB", (2, 1), RED)
    keyed.putpixel((1, 0), BLUE)
    keyed.save(tmp_path / "keyed.png", transparency=RED)  # a tRNS colour key: red is transparent
    assert pixels(open_image(tmp_path / "keyed.png")).tolist() == [[[255, 255, 255], list(BLUE)]]

    tall = Image.new("RGB", (2, 4), GREEN)
    exif = tall.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    tall.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (4, 2)
    data = (tmp_path / "keyed.png").read_bytes()
    assert np.array_equal(pixels(open_image(data)), pixels(open_image("data:image/png;base64," +
                                                                      base64.b64encode(data).decode())))
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(OSError, match=r"could not read image '.*bad\.png'"):
        open_image(tmp_path / "bad.png")
    with pytest.raises(OSError, match="neither an existing image file"):
        open_image(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="got int"):
        open_image(3)


@pytest.mark.parametrize("drip_headers", [False, True], ids=["slow body", "slow headers"])
def test_url_download_has_an_overall_deadline(drip_headers):
    """One byte every 0.5 s: every read succeeds within httpx's per-read timeout, the download
    must still stop at `timeout` (issue 17.1)."""
    with DripServer(interval=0.5, drip_headers=drip_headers, max_seconds=10) as server:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"not downloaded within 1\.5 s"):
            fetch_url(f"{server.url}/slow.jpg", timeout=1.5)
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 3
        while not server.drip_ended and time.monotonic() < deadline:  # the client hung up
            time.sleep(0.05)
    assert 1.4 <= elapsed < 3.0, elapsed
    assert server.drip_ended and server.drip_ended[0] - server.requests[0][1] < 4.0


@pytest.mark.parametrize("length_header", [True, False])
def test_url_download_has_a_size_cap(length_header):
    with DripServer(big_bytes=5000, big_length_header=length_header) as server:
        message = "announces 5,000 bytes" if length_header else "more than 1,000 bytes"
        with pytest.raises(ImageLoadError, match=message):
            fetch_url(f"{server.url}/big", max_bytes=1000)
        assert len(fetch_url(f"{server.url}/big", max_bytes=5000)) == 5000


def test_url_loading_inside_a_running_event_loop():
    """A notebook's running loop: the download runs in a helper thread with its own loop."""
    buffer = io.BytesIO()
    Image.new("RGBA", (3, 3), (*RED, 0)).save(buffer, format="PNG")
    with DripServer(files={"/a.png": buffer.getvalue()}) as server:
        async def inside():
            return open_image(f"{server.url}/a.png", timeout=5)

        image = asyncio.run(inside())
    assert pixels(image).tolist() == [[[255] * 3] * 3] * 3


def test_metrics_copies_are_links_to_the_one_file():
    real = ROOT / "modeling_clipcap" / "image_loading.py"
    assert real.is_file() and not real.is_symlink()
    linked = [ROOT / "metrics" / "image_loading.py"]
    linked += [folder / "image_loading.py" for folder in (ROOT / "metrics").iterdir()
               if (folder / "clip_judge.py").exists()]
    assert len(linked) >= 4  # metrics/ and each module folder with the judge
    for path in linked:
        assert path.is_symlink() and path.resolve() == real.resolve(), path
        assert not os.path.isabs(os.readlink(path))  # relative, so that clones keep working
    # each module script imports it itself, so that evaluate.load copies it beside clip_judge.py
    for path in linked[1:]:
        script = path.parent / f"{path.parent.name}.py"
        assert "\nfrom .image_loading import" in script.read_text(), script
