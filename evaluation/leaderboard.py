"""A Table-1-style leaderboard (NDLB Sec. 3.2): caption the benchmarks with several models, score
every captions file with the same judge, one row per model.

:func:`run_leaderboard` captions the images of the benchmarks with each model spec (through the
resumable caption cache), writes each model's captions file and results, scores the extra
captions files given as they are, and writes ``leaderboard.md``, ``leaderboard.csv`` and
``leaderboard.json``. A row's values are those of :func:`~evaluation.scoring.evaluate_captions`
on that row's captions file.
"""

from __future__ import annotations

import gc
import logging
import re
from pathlib import Path
from typing import Any

from common import write_json, write_text

from .benchmarks import BenchmarkData
from .caption_cache import caption_images
from .captioners import ModelSpec, load_captioner, parse_model_spec
from .captions import read_captions, write_captions
from .scoring import JudgeSettings, evaluate_captions
from .tables import leaderboard_csv, leaderboard_markdown

__all__ = ["run_leaderboard", "LEADERBOARD_FILES"]

logger = logging.getLogger(__name__)
LEADERBOARD_FILES = ("leaderboard.md", "leaderboard.csv", "leaderboard.json")


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "model"
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}-{n}", n + 1
    taken.add(slug)
    return slug


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def run_leaderboard(models: list[str | ModelSpec], data: BenchmarkData, judge=None, *, out_dir: str | Path,
                    captions_files: list[str] | None = None, cache_dir: str | Path | None = None,
                    captioner_defaults: dict[str, Any] | None = None, benchmarks: list[str] | None = None,
                    num_distractors: int = 99, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Caption with each model, score every captions file with one judge, write the leaderboard.

    Args:
        models: model specs (``"transformers:ID"``, see :func:`~evaluation.captioners.parse_model_spec`).
        data: the benchmark data (:func:`~evaluation.benchmarks.load_benchmarks`).
        judge: a loaded ``ClipJudge`` or :class:`~evaluation.scoring.JudgeSettings` (loaded once here).
        out_dir: where ``captions/<model>.json``, ``results/<model>.json`` and the leaderboard go.
        captions_files: captions files to add as rows (named by their file name).
        cache_dir: the caption cache (default :func:`~evaluation.caption_cache.default_cache_dir`).
        captioner_defaults: options for every captioner where its spec sets none (``device``,
            ``dtype``, ``batch_size``, ``prompt``, ``max_new_tokens``, ``num_beams``).
        benchmarks, num_distractors, seed: as :func:`~evaluation.scoring.evaluate_captions`.

    Returns:
        ``{"judge", "benchmarks", "rows": [...], "files": {...}}``; each row holds ``model``,
        ``kind``, ``params``, ``table``, ``over_context`` (captions longer than the judge's context),
        ``captions_file``, ``results_file``, and for a model its ``settings`` and ``captioning`` counts.
    """
    specs = [parse_model_spec(m) if isinstance(m, str) else m for m in models]  # bad specs fail before any work
    files = [Path(f) for f in captions_files or []]
    if not specs and not files:
        raise ValueError("a leaderboard needs models (--models) or captions files (--captions)")
    out = Path(out_dir)
    if judge is None:
        judge = JudgeSettings()
    if isinstance(judge, JudgeSettings) and benchmarks and set(benchmarks) <= {"nlg"}:
        judge = None  # CIDEr-D / BLEU only: no judge needed
    images = data.images_to_caption() if specs else {}
    taken: set[str] = set()
    kw = dict(benchmarks=benchmarks, num_distractors=num_distractors, seed=seed)
    rows: list[dict[str, Any]] = []

    def score(captions: dict[str, str], path: Path) -> dict[str, Any]:
        nonlocal judge
        if isinstance(judge, JudgeSettings):  # loaded once, at the first scoring (after the first captioning)
            judge = judge.load()
        return evaluate_captions(captions, data, judge, captions_file=str(path), **kw)

    for spec in specs:
        name = spec.display_name
        slug = _slug(name, taken)
        logger.info("== %s (%s): %d images", name, spec.kind, len(images))
        with load_captioner(spec, **(captioner_defaults or {})) as captioner:
            captions, counts = caption_images(captioner, images, cache_dir, progress=progress)
            params, settings = captioner.num_parameters(), captioner.settings()
        _release_memory()
        captions_path = write_captions(out / "captions" / f"{slug}.json", captions)
        results = score(captions, captions_path)
        rows.append(_row(name, spec.kind, params, captions_path, results, out / "results" / f"{slug}.json",
                         settings=settings, captioning=counts))

    for path in files:
        name = path.stem
        results = score(read_captions(path), path)
        rows.append(_row(name, "captions file", None, path, results, out / "results" / f"{_slug(name, taken)}.json"))

    board = {"judge": getattr(judge, "name", None), "benchmarks": sorted({b for r in rows for b in r["benchmarks"]}),
             "rows": rows, "files": {f.split(".")[-1]: str(out / f) for f in LEADERBOARD_FILES}}
    write_text(out / "leaderboard.md", leaderboard_markdown(rows) + "\n")
    write_text(out / "leaderboard.csv", leaderboard_csv(rows))
    write_json(out / "leaderboard.json", board)
    return board


def _row(name: str, kind: str, params: int | None, captions_path: Path, results: dict[str, Any],
         results_path: Path, **extra: Any) -> dict[str, Any]:
    write_json(results_path, results)
    return {"model": name, "kind": kind, "params": params, "table": results["table"],
            "over_context": (results.get("over_context") or {}).get("count"), "benchmarks": results["benchmarks"],
            "missing": {b: len(m) for b, m in results["missing"].items()}, "captions_file": str(captions_path),
            "results_file": str(results_path), **extra}
