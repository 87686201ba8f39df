"""Resumable caption cache: each image is captioned once per (model, prompt, settings).

The captions of one captioner live in ``<cache_dir>/<model>-<key>.jsonl``, ``key`` the SHA-256 of
the captioner's :meth:`~evaluation.captioners.Captioner.settings` (model and revision, prompt,
decoding settings, dtype), with the settings beside it in ``<model>-<key>.json``. Records are keyed
by the SHA-256 of the image's encoded bytes (the same image under another benchmark's id is not
captioned again; another image under a known id is) and appended batch by batch, flushed and
fsynced: a run killed at any moment (SIGKILL included) loses at most the batch in flight, and an
incomplete last line left by a kill mid-write is cut off when the cache is opened again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .benchmarks import image_bytes
from .captioners import Captioner

__all__ = ["CaptionCache", "CaptioningError", "caption_images", "default_cache_dir", "settings_key"]

logger = logging.getLogger(__name__)


class CaptioningError(RuntimeError):
    """A model could not caption an image (after the client's retries); the others are cached."""


def default_cache_dir() -> Path:
    """``$NDLB_CAPTION_CACHE``, else ``ndlb_captions`` under the Hugging Face cache folder."""
    from huggingface_hub import constants

    return Path(os.environ.get("NDLB_CAPTION_CACHE") or Path(constants.HF_HOME) / "ndlb_captions")


def settings_key(settings: dict[str, Any]) -> str:
    """SHA-256 (16 hex digits) of the canonical JSON of a captioner's settings."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class CaptionCache:
    """The cached captions of one captioner, by image hash (see the module docstring).

    Args:
        cache_dir: the cache folder (shared by all captioners).
        settings: the captioner's settings.
    """

    def __init__(self, cache_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
        from common import write_json

        self.key = settings_key(settings)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(settings.get("model", "model")).strip("/"))[-60:]
        root = Path(cache_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f"{slug}-{self.key}.jsonl"
        meta = self.path.with_suffix(".json")
        if not meta.is_file():
            write_json(meta, settings)
        self.records: dict[str, dict[str, Any]] = {}
        self.dropped_partial = False
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a kill in mid-write: cut the incomplete line off
            cut = raw.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)
            raw, self.dropped_partial = raw[:cut], True
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.records[rec["image_sha256"]] = rec
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}:{n}: not a caption cache record ({e}); the cache is written "
                                 "line by line, so this file was changed by hand: delete it to caption again") from e

    def __len__(self) -> int:
        return len(self.records)

    def get(self, image_sha256: str) -> dict[str, Any] | None:
        return self.records.get(image_sha256)

    def add(self, records: list[dict[str, Any]]) -> None:
        """Append records (one line each), flushed and fsynced before returning."""
        if not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[r["image_sha256"]] = r


def caption_images(captioner: Captioner, images: dict[str, Any], cache_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> tuple[dict[str, str], dict[str, int]]:
    """Caption ``{id: image source}`` with ``captioner``, reusing and filling its cache.

    Returns ``({id: caption}, counts)``, counts holding ``images``, ``cached`` (found in the cache)
    and ``captioned`` (new). Raises :class:`CaptioningError` naming the first image that failed,
    after caching the rest of its batch (a rerun retries only what is missing).
    """
    cache = CaptionCache(cache_dir if cache_dir is not None else default_cache_dir(), captioner.settings())
    if cache.dropped_partial:
        logger.warning("note: %s: an incomplete last line (a killed run) was removed", cache.path)
    ids = list(images)
    hashes: dict[str, str] = {}
    for i in tqdm(ids, desc="hashing images", unit="img", disable=not progress or len(ids) < 1000):
        hashes[i] = hashlib.sha256(image_bytes(images[i])).hexdigest()
    todo = list(dict.fromkeys(h for h in hashes.values() if cache.get(h) is None))
    first_id = {}
    for i, h in hashes.items():
        first_id.setdefault(h, i)
    pending = set(todo)
    counts = {"images": len(ids), "cached": sum(1 for i in ids if hashes[i] not in pending), "captioned": 0}
    if todo:
        logger.info("%s: %d images to caption, %d cached (%s)", captioner.name, len(todo), counts["cached"], cache.path)
    bar = tqdm(total=len(todo), desc=f"captioning ({captioner.name})", unit="img", disable=not progress,
               dynamic_ncols=True)
    try:
        for start in range(0, len(todo), captioner.batch_size):
            batch = todo[start:start + captioner.batch_size]
            answers = captioner.caption([image_bytes(images[first_id[h]]) for h in batch])
            records = [{"image_sha256": h, "id": first_id[h], "caption": a.text, "raw": a.raw,
                        "finish_reason": a.finish_reason} for h, a in zip(batch, answers) if a.error is None]
            cache.add(records)
            counts["captioned"] += len(records)
            bar.update(len(batch))
            failed = [(h, a) for h, a in zip(batch, answers) if a.error is not None]
            if failed:
                h, a = failed[0]
                more = f" (and {len(failed) - 1} more in this batch)" if len(failed) > 1 else ""
                raise CaptioningError(f"{captioner.name}: image {first_id[h]} could not be captioned{more}: {a.error}. "
                                      f"The {len(cache)} captions made so far are cached in {cache.path}: rerun to "
                                      "caption the rest")
    finally:
        bar.close()
    return {i: cache.get(hashes[i])["caption"] for i in ids}, counts
