"""Captions files: the one format every captioner's output is scored from.

A *captions file* maps image ids to one caption each, as

- json: ``{"<id>": "caption", ...}`` or a list of ``{"cocoid"|"image_id"|"id"|"image": id,
  "caption": str}`` records;
- jsonl: one such record per line;
- csv (UTF-8, with or without the byte-order mark spreadsheets write): a column ``image_id``,
  ``cocoid``, ``id`` or ``image`` and a column ``caption``.

Ids compare as strings, and integer-like ids lose leading zeros (``"000000000139"`` is ``139``).
``image`` is what ``inference.py`` writes (a file path or URL): :func:`match_captions` maps such
keys to benchmark ids by their file name (``000000000139.jpg``, ``COCO_val2014_000000000139.jpg``,
``<set>/img3.jpg`` for ImageCoDe). :func:`write_captions` writes the json form.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from common import not_found

__all__ = ["norm_id", "read_captions", "match_captions", "file_ids", "write_captions", "IMAGE_SUFFIXES"]

logger = logging.getLogger(__name__)

_ID_KEYS = ("cocoid", "image_id", "id", "image")  # "image": inference.py's output (a path or URL)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
_COCO_NAME = re.compile(r"^COCO_(?:train|val|test)\d{4}_(\d+)$")


def norm_id(x: Any) -> str:
    """Ids compare as strings; integer-like ids lose leading zeros ("000000123" == 123)."""
    s = str(x).strip()
    return str(int(s)) if s.isdigit() else s


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key that appears twice (a plain parser keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears more than once in one JSON object; keep one caption per id")
        out[key] = value
    return out


def _records(path: Path) -> Any:
    """The parsed content of a captions file (a dict or a list of records)."""
    suffix = path.suffix.lower()
    line = 0
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                return list(csv.DictReader(f))
        if suffix == ".jsonl":
            records = []
            with open(path, encoding="utf-8") as f:
                for line, text in enumerate(f, 1):
                    if text.strip():
                        records.append(json.loads(text, object_pairs_hook=_unique_keys))
            return records
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        where = f"{path}:{line}" if line else str(path)
        raise ValueError(f"{where}: not a valid {suffix.lstrip('.') or 'json'} captions file ({e})") from e
    except ValueError as e:  # a duplicate key
        raise ValueError(f"{f'{path}:{line}' if line else path}: {e}") from e


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """Read a captions file (see the module docstring) into ``{id: caption}``, captions stripped.

    A value that is a list of captions keeps its first one (counted and logged). An id given twice
    (in any format), a record without id or caption, or a caption that is not a string is a
    ``ValueError`` naming the file (and line or id); a missing file a ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.is_file():
        raise not_found("captions file", path)
    records = _records(path)
    pairs: list[tuple[Any, Any]] = []
    if isinstance(records, dict):
        pairs = list(records.items())
    elif isinstance(records, list):
        for n, r in enumerate(records):
            if not isinstance(r, dict):
                raise ValueError(f"{path}: record {n} is {type(r).__name__}, expected an object")
            key = next((k for k in _ID_KEYS if k in r), None)
            if key is None or "caption" not in r:
                raise ValueError(f"{path}: record {n} needs 'cocoid', 'image_id', 'id' or 'image' and 'caption' "
                                 f"(has {sorted(r)})")
            pairs.append((r[key], r["caption"]))
    else:
        raise ValueError(f"{path}: expected a JSON object or list, got {type(records).__name__}")

    out: dict[str, str] = {}
    lists = 0
    for k, v in pairs:
        if isinstance(v, list):
            lists += 1
            v = v[0] if v else None
        if not isinstance(v, str):
            raise ValueError(f"{path}: the caption of id {k!r} is {type(v).__name__}, expected a string")
        k = norm_id(k)
        if k in out:
            raise ValueError(f"{path}: id {k} has more than one caption")
        out[k] = v.strip()
    if lists:
        logger.warning("note: %d ids map to a list of captions; the first of each is scored", lists)
    if not out:
        raise ValueError(f"{path}: no captions")
    return out


def file_ids(key: str) -> list[str]:
    """Ids an image file path or URL may stand for (none when its name has no image suffix): the
    name without the suffix (COCO 2014 names give the number; ``000000000139`` gives ``139``), then
    ``<folder>/<name>`` (ImageCoDe's ``<set>/img3``)."""
    name_path = urlparse(key).path if key.startswith(("http://", "https://")) else key
    parts = [p for p in re.split(r"[/\\]", name_path) if p]
    if not parts or Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
        return []
    stem = Path(parts[-1]).stem
    coco = _COCO_NAME.match(stem)
    ids = [norm_id(coco.group(1) if coco else stem)]
    if len(parts) > 1:
        ids.append(f"{parts[-2]}/{stem}")
    return ids


def match_captions(captions: dict[str, str], known_ids: set[str] | None = None) -> dict[str, str]:
    """``{id: caption}`` with file-path keys (``inference.py``'s ``image`` column) replaced by the
    id they name: a key that is a benchmark id (in ``known_ids``) stays; otherwise its file name
    (see :func:`file_ids`) is used, preferring a form in ``known_ids``. Two keys that end up as
    the same id are an error naming both."""
    known = known_ids or set()
    out: dict[str, str] = {}
    origin: dict[str, str] = {}
    for key, caption in captions.items():
        candidates = file_ids(key) if key not in known else []
        target = next((c for c in candidates if c in known), candidates[0] if candidates else key)
        if target in out:
            raise ValueError(f"the captions file has two captions for id {target}: under {origin[target]!r} and "
                             f"{key!r}; keep one")
        out[target], origin[target] = caption, key
    return out


def write_captions(path: str | os.PathLike, captions: dict[str, str]) -> Path:
    """Write ``{id: caption}`` as a json captions file (atomically: a reader never sees half a file)."""
    from common import write_json

    return write_json(path, {str(k): v for k, v in captions.items()})
