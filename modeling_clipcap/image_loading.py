"""The project's one image loader: what every captioner, judge and collator is given to look at.

:func:`open_image` turns any image source into an 8-bit RGB PIL image:

- a PIL image (used as given);
- a local path (``str`` or ``os.PathLike``), raw encoded ``bytes``, a base64 ``data:image/...``
  URL, or a ``datasets`` ``{"bytes": ..., "path": ...}`` dict (``datasets.Image(decode=False)``):
  decoded, EXIF orientation applied;
- an ``http(s)`` URL: fetched by :func:`fetch_url` as a streamed read with an **overall** deadline
  (connect, headers and body together, not per socket read: a server that sends one byte every
  half second still fails at the deadline) and a size cap, then decoded as above.

Every mode becomes RGB through :func:`to_rgb`: transparency (RGBA, LA, PA, and P or L/RGB images
with a ``transparency`` entry) is composited on **white**; CMYK, palette, greyscale, 16-bit and
float images are converted. A transparent pixel therefore reaches the captioner and the CLIP judge
as the same (255, 255, 255), whichever path opened it.

Why one file has several homes. ``modeling_clipcap/`` ships to the Hub as remote code and may
import only files of its own folder, so the implementation lives here and
``pipeline_clipcap.py`` imports it relatively (transformers' ``custom_object_save`` copies relative
imports recursively, so a saved model folder carries this file). ``metrics/clip_judge.py`` is
vendored into each ``metrics/<module>/`` folder and may import only third-party libraries or
siblings that travel with it: ``metrics/image_loading.py`` is a symbolic link to this file and
``metrics/<module>/image_loading.py`` a link to ``../image_loading.py`` (git stores links;
``evaluate`` and ``huggingface_hub`` follow them when they copy a module). ``evaluate.load`` copies
only the files that a module script imports itself at the start of a line, so each module script
also imports this file (``from .image_loading import open_image``). The trainers' collators reach it
as ``metrics.clip_judge.load_image``. Under its two package names (``modeling_clipcap.image_loading``
and ``metrics.image_loading``) Python holds two module objects of the same code; catch
:class:`ImageLoadError` as ``OSError``, which it subclasses.

This file imports only the standard library, numpy, PIL and (for URLs) httpx.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_TIMEOUT", "ImageLoadError", "fetch_url", "open_image", "to_rgb"]

DEFAULT_TIMEOUT = 20.0  # seconds for a whole URL download (connect, headers and body)
DEFAULT_MAX_BYTES = 50 * 1024 * 1024  # largest URL download accepted


class ImageLoadError(OSError):
    """An image source could not be fetched or decoded (the message names the source)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency is composited on white; CMYK, greyscale, palette,
    16-bit and float images are converted. An RGB image is returned as it is."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        span = float(array.max() - array.min()) or 1.0
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA")  # a transparent palette index / colour key becomes alpha 0
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _shown(source: str) -> str:
    return source if len(source) < 200 else source[:200] + "..."


async def _fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    import httpx

    async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
        async with client.stream("GET", url) as response:
            response.raise_for_status()
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ImageLoadError(f"{_shown(url)}: the server announces {int(declared):,} bytes, more than the "
                                     f"limit of {max_bytes:,}; raise the size limit to read it")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise ImageLoadError(f"{_shown(url)}: more than {max_bytes:,} bytes; raise the size limit "
                                         "to read it")
            return bytes(data)


def _run(coroutine: Any) -> Any:
    """Run a coroutine to completion from synchronous code, also where an event loop is running
    in this thread (a notebook): then in a helper thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def fetch_url(url: str, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
    """The body of an ``http(s)`` URL (redirects followed), read in full within ``timeout`` seconds
    overall (default 20) and at most ``max_bytes`` long (default 50 MiB).

    Raises:
        TimeoutError: the whole download did not finish within ``timeout`` seconds.
        ImageLoadError: the body is larger than ``max_bytes``.
        httpx.HTTPStatusError, httpx.TransportError: an HTTP error status, a refused connection ...
    """
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    if timeout <= 0 or max_bytes <= 0:
        raise ValueError(f"timeout ({timeout}) and max_bytes ({max_bytes}) must be positive")
    import httpx

    start = time.monotonic()
    try:
        return _run(asyncio.wait_for(_fetch(url, timeout, max_bytes), timeout))
    except (TimeoutError, httpx.TimeoutException) as error:  # the overall deadline, or httpx's per-phase one
        raise TimeoutError(f"{_shown(url)}: not downloaded within {timeout:g} s (overall deadline; "
                           f"gave up after {time.monotonic() - start:.1f} s); raise the timeout or check "
                           "the server") from error


def _decode(data: bytes, name: str) -> Image.Image:
    """Decoded, EXIF-orientated, RGB."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as error:  # PIL: unknown format, truncated or corrupt data
        raise ImageLoadError(f"could not read image {name}: {type(error).__name__}: {error}") from error
    return to_rgb(image)


def open_image(source: Any, timeout: float | None = None, max_bytes: int | None = None) -> Image.Image:
    """One image source as an 8-bit RGB PIL image (transparency on white), see the module docstring.

    Args:
        source: a PIL image, a path, an http(s) or ``data:image/...`` URL, encoded bytes, or a
            ``{"bytes": ..., "path": ...}`` dict.
        timeout: overall deadline of a URL download in seconds (default 20).
        max_bytes: largest URL download in bytes (default 50 MiB).

    Raises:
        ImageLoadError (an ``OSError``): the file is missing or not a readable image.
        TimeoutError: a URL was not downloaded within ``timeout``.
        TypeError: ``source`` is none of the accepted kinds.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, dict):  # datasets.Image(decode=False)
        if source.get("bytes"):
            return _decode(source["bytes"], repr(source.get("path") or "<bytes>"))
        if not source.get("path"):
            raise ImageLoadError("an image dict with neither 'bytes' nor 'path'")
        source = source["path"]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), "<bytes>")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(f"expected a PIL image, a path, a URL, bytes or a {{'bytes', 'path'}} dict, "
                        f"got {type(source).__name__}")
    if source.startswith(("http://", "https://")):
        return _decode(fetch_url(source, timeout, max_bytes), repr(_shown(source)))
    if source.startswith("data:image/") and "," in source:
        try:
            data = base64.b64decode(source.split(",", 1)[1])
        except (binascii.Error, ValueError) as error:
            raise ImageLoadError(f"a data: URL whose payload is not base64 ({error})") from error
        return _decode(data, "<data: URL>")
    if os.path.isfile(source):
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as error:
            raise ImageLoadError(f"could not read image {source!r}: {error}") from error
        return _decode(data, repr(source))
    raise ImageLoadError(f"{_shown(source)!r} is neither an existing image file nor an http(s) or data: URL")
