"""Crash-safe JSONL shard store of Visual Caption Boost outputs (one folder per stage).

A stage folder holds ``shards/*.jsonl`` files, each a complete set of records (one JSON
object per line, keyed by ``cocoid``), and ``runs/*.json`` manifests. Records are buffered in
memory and written as a whole new shard with ``common.write_bytes`` (a ``.<name>.<random>.part``
file written, fsynced and ``os.replace``-d to ``<name>.jsonl``, the folder fsynced). A shard file therefore
either exists complete or not at all; a process killed at any moment (SIGKILL included)
loses at most its buffer, whose ids the next run redoes. On start a writer deletes its own
stale ``.part`` files and reads every complete shard to know the finished ids, so a rerun
produces each id exactly once.

Several writers (``--shard i/n`` on several machines) may share a folder: each names its
files ``s<i>of<n>-<session>-<seq>.jsonl``, so names never collide and folders from several
machines merge by copying.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import Callable

from common import write_bytes

__all__ = ["ShardStore", "read_records"]

logger = logging.getLogger(__name__)


def _read_shard(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                int(rec["cocoid"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{lineno}: not a valid record ({e}). vcb writes shards atomically, so this file was "
                    "changed by hand or copied partially; move it out of the folder and rerun to redo its ids."
                ) from e
            out.append(rec)
    return out


def read_records(stage_dir: str | Path) -> dict[int, dict]:
    """All records of a stage folder, by COCO id (the first one wins if an id was written twice,
    e.g. by two overlapping manual runs; a warning gives the count)."""
    shard_dir = Path(stage_dir) / "shards"
    records: dict[int, dict] = {}
    dups = 0
    if not shard_dir.is_dir():
        return records
    for path in sorted(shard_dir.glob("*.jsonl")):
        for rec in _read_shard(path):
            cid = int(rec["cocoid"])
            if cid in records:
                dups += 1
                continue
            records[cid] = rec
    if dups:
        logger.warning("%s: %d duplicate ids ignored (written by overlapping runs)", shard_dir, dups)
    return records


class ShardStore:
    """Buffered, atomic JSONL shard writer for one stage folder.

    Args:
        stage_dir: the stage folder (``<run_dir>/<stage>``).
        writer: writer tag, unique per concurrently running process (``s<i>of<n>``).
        shard_size: records per shard file (a kill loses at most this many).
        flush_every_s: also write a shard when the oldest buffered record is this old.
        on_flush: called after each shard file is written (the pipeline updates its run manifest
            there, so that a killed run's manifest counts what is on disk).
    """

    def __init__(self, stage_dir: str | Path, writer: str = "s0of1", shard_size: int = 256,
                 flush_every_s: float = 60.0, on_flush: Callable[[], None] | None = None) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.stage_dir = Path(stage_dir)
        self.shard_dir = self.stage_dir / "shards"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.writer = writer
        self.shard_size = shard_size
        self.flush_every_s = flush_every_s
        self.on_flush = on_flush
        self.session = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self._buffer: list[dict] = []
        self._buffer_since: float | None = None
        self._seq = 0
        self.written = 0

    def load(self) -> dict[int, dict]:
        """Delete this writer's stale ``.part`` files and return the finished records by id."""
        for part in self.shard_dir.glob(f".{self.writer}-*.part"):
            part.unlink(missing_ok=True)
        return read_records(self.stage_dir)

    def add(self, record: dict) -> None:
        """Buffer one finished record; writes a shard when the buffer is full or old."""
        if self._buffer_since is None:
            self._buffer_since = time.monotonic()
        self._buffer.append(record)
        if len(self._buffer) >= self.shard_size or time.monotonic() - self._buffer_since >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records as one complete shard file (atomic)."""
        if not self._buffer:
            return
        name = f"{self.writer}-{self.session}-{self._seq:05d}.jsonl"
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._buffer).encode("utf-8")
        write_bytes(self.shard_dir / name, data)  # through .<name>.<random>.part
        self.written += len(self._buffer)
        self._seq += 1
        self._buffer = []
        self._buffer_since = None
        if self.on_flush is not None:
            self.on_flush()

    def close(self) -> None:
        """Flush what is buffered."""
        self.flush()
