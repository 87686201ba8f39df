"""Evaluation: caption benchmarks with any model, score captions files, print leaderboards.

Modules (each importable on its own; this package imports ``metrics/``, ``modeling_clipcap/`` and
``datasets_scripts/`` code, never a top-level script):

- :mod:`.captions`: captions files (json / jsonl / csv: image id -> caption), reading and writing;
- :mod:`.benchmarks`: TrueMatch (our dataset or the authors' ``{3,5,7}.json``), the evaluated set
  of RD100 / CLIPScore / CIDEr-D (references), ImageCoDe;
- :mod:`.scoring`: :func:`evaluate_captions` (the ``evaluate`` modules with one CLIP judge,
  CIDEr-D / BLEU, vocabulary statistics);
- :mod:`.tables`: the paper-style table, leaderboards as markdown / CSV / JSON;
- :mod:`.vlm`: the one "caption an image with a transformers VLM" implementation (also used by the
  VCB VisualCap stage);
- :mod:`.captioners`: ClipCap, transformers, open_clip CoCa and OpenAI-compatible captioners;
- :mod:`.caption_cache`: resumable captioning, cached per (model, prompt, settings);
- :mod:`.leaderboard`: :func:`run_leaderboard` (NDLB Table 1 for any set of models).

Example::

    from evaluation import JudgeSettings, load_benchmarks, read_captions, evaluate_captions, format_table

    data = load_benchmarks(truematch="truematch/", references="coco/")
    results = evaluate_captions(read_captions("preds.json"), data, JudgeSettings())
    print(format_table(results["table"]))

Functions raise exceptions (``ValueError``, ``OSError``, :class:`BenchmarkRequestError`,
:class:`CaptioningError`); notes and warnings go to the ``evaluation`` logger
(:func:`log_to_stderr` shows them as the command line does).
"""

from __future__ import annotations

import logging
import sys

from common import format_table, write_json

from .benchmarks import (BENCHMARKS, BenchmarkData, BenchmarkRequestError, EvalSet, ImageCoDeData, ImageFolder,
                         TrueMatchData, load_benchmarks, load_imagecode, load_references, load_truematch)
from .captions import match_captions, norm_id, read_captions, write_captions
from .scoring import JudgeSettings, evaluate_captions, evaluate_file, load_metric, nlg_scores, vocabulary_stats
from .tables import leaderboard_csv, leaderboard_markdown

__all__ = [
    "BENCHMARKS", "BenchmarkData", "BenchmarkRequestError", "EvalSet", "ImageCoDeData", "ImageFolder",
    "TrueMatchData", "load_benchmarks", "load_imagecode", "load_references", "load_truematch",
    "match_captions", "norm_id", "read_captions", "write_captions",
    "JudgeSettings", "evaluate_captions", "evaluate_file", "load_metric", "nlg_scores", "vocabulary_stats",
    "format_table", "leaderboard_csv", "leaderboard_markdown", "write_json", "log_to_stderr",
    "CaptioningError", "run_leaderboard", "load_captioner", "parse_model_spec",
]


def __getattr__(name: str):
    """The captioning side (torch, transformers, httpx) is imported only when used."""
    if name == "CaptioningError":
        from .caption_cache import CaptioningError

        return CaptioningError
    if name == "run_leaderboard":
        from .leaderboard import run_leaderboard

        return run_leaderboard
    if name in ("load_captioner", "parse_model_spec"):
        from . import captioners

        return getattr(captioners, name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted."""

    @property
    def stream(self):  # noqa: D401 - logging API
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_to_stderr(level: int = logging.INFO) -> None:
    """Show the ``evaluation`` logger's notes and warnings on stderr, message text only (once)."""
    logger = logging.getLogger("evaluation")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
