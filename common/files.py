"""Files written whole or not at all, and JSON read with errors that name the file.

Every write goes through one path: a temporary file in the destination's folder, flushed and
fsynced, ``os.replace``-d onto the destination, then the folder fsynced. A reader therefore sees
the old file or the new one, never a half-written one, also after a crash or power loss (the
rename is durable once the call returns)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import not_found

__all__ = ["fsync_dir", "json_safe", "read_json", "staged_dir", "write_bytes", "write_json", "write_text"]


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename in it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside ``out``, filled by the ``with`` block; when the block ends
    without an error it replaces ``out`` (an old ``out`` is removed first), else it is removed and
    ``out`` stays as it was."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring); folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically and durably (see the module docstring)."""
    return write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON data: NaN / infinite numbers become None (JSON has no NaN: it is
    written null), numpy / torch scalars plain numbers, tuples lists, paths and other objects strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``json_safe(obj)`` to ``path`` atomically and durably, UTF-8 (non-ASCII kept as it is),
    ending in a newline; ``indent=None`` writes it on one line."""
    text = json.dumps(json_safe(obj), indent=indent, ensure_ascii=False)
    return write_text(path, text + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file", expected: str | None = None) -> Any:
    """The JSON data in ``path``. A missing file is a ``FileNotFoundError`` "<what> not found: <path>",
    a file that is not JSON (or not UTF-8) a ``ValueError`` "<path>: not valid JSON (<why>)", followed
    by "; expected <expected>" when given."""
    path = Path(path)
    hint = f"; expected {expected}" if expected else ""
    if not path.is_file():
        raise not_found(what, path, hint[2:] or None)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}){hint}") from e
