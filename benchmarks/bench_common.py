"""What every benchmark script shares: writing its results JSON."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: Path, results: dict) -> dict:
    """Write `results` as indented JSON to `path` (folders created), say where, return them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return results
