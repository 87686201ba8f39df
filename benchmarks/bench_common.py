"""What every benchmark script shares: writing its results JSON (the scripts put the repository
root on ``sys.path`` before importing this)."""

from __future__ import annotations

from pathlib import Path

from common import write_json


def write_results(path: Path, results: dict) -> dict:
    """Write `results` as indented JSON to `path` atomically (folders created), say where, return them."""
    write_json(path, results)
    print(f"wrote {path}")
    return results
