"""Score captions on TrueMatch, RD100, CLIPScore, ImageCoDe and CIDEr-D / BLEU (NDLB Sec. 3-5).

Retrieval metrics go through the project's ``evaluate`` modules (``metrics/truematch``,
``metrics/self_retrieval``, ``metrics/clip_score``) and hence the one CLIP-scoring core
(``metrics/clip_judge.py``); CIDEr-D and BLEU through ``metrics/cider.py`` and ``metrics/bleu.py``.

Two CLIP-based scores have similar names and different scales; the results table keeps them apart:
``ClipSc`` is the paper's score, ``100 * max(cos, 0)`` (0-100, reported with RD100 in NDLB Table 2;
the ``clipsc`` key of the ``truematch`` and ``rd*`` results), ``CLIP-S`` is Hessel et al.'s
CLIPScore, ``2.5 * max(cos("A photo depicts " + caption), 0)`` (0-2.5, shown x100; the
``clip_score`` key of the ``clipscore`` results).

Every image that a benchmark needs but the captions lack is reported by id and counted as wrong
(R@1) / zero (scores); captions for ids that no benchmark holds are counted and named; nothing is
silently dropped. Messages go to the ``evaluation`` logger.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .benchmarks import MAX_IDS_SHOWN, BenchmarkData, BenchmarkRequestError, EvalSet
from .captions import match_captions, read_captions

__all__ = ["JudgeSettings", "load_metric", "vocabulary_stats", "nlg_scores", "count_over_context",
           "evaluate_captions", "evaluate_file", "judge_problem"]

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
_METRICS: dict[str, Any] = {}


@dataclass
class JudgeSettings:
    """How to load the CLIP judge (see ``metrics.clip_judge.ClipJudge.from_pretrained``)."""

    name: str = "openai/clip-vit-base-patch32"
    backend: str = "auto"
    pretrained: str | None = None
    device: str | None = None
    batch_size: int = 64
    cache_dir: str | None = None
    dtype: str | None = None

    def load(self):
        from metrics.clip_judge import ClipJudge

        return ClipJudge.from_pretrained(self.name, backend=self.backend, pretrained=self.pretrained,
                                         device=self.device, batch_size=self.batch_size, cache_dir=self.cache_dir,
                                         dtype=self.dtype)


def judge_problem(name: str) -> str | None:
    """Why a judge name is neither a folder, a Hub repo id nor an open_clip model name, or None."""
    import os

    if os.path.exists(name) or name.startswith(("hf-hub:", "local-dir:")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return (f"--judge {name}: no such folder, and not a Hub repo id or open_clip model name; give an existing "
                "folder, a Hub id (openai/clip-vit-base-patch32) or an open_clip name (ViT-B-32)")
    return None


def load_metric(name: str):
    """A project evaluate module (``metrics/<name>``: truematch, self_retrieval, clip_score,
    cider_d), loaded once per process."""
    if name not in _METRICS:
        import evaluate

        _METRICS[name] = evaluate.load(str(ROOT / "metrics" / name))
    return _METRICS[name]


def vocabulary_stats(captions: list[str]) -> dict[str, float]:
    """Vocabulary of PTB-tokenised, lower-cased captions (punctuation removed, as for CIDEr):
    distinct words, words used >= 5 times (NDLB Table 6) and mean caption length in words."""
    from metrics.ptb_tokenizer import ptb_tokenize

    tokens = [t.split() for t in ptb_tokenize(captions)] if captions else []
    counts = Counter(w for ws in tokens for w in ws)
    return {"vocab_size": len(counts), "words_ge5": sum(c >= 5 for c in counts.values()),
            "mean_length": sum(map(len, tokens)) / len(tokens) if tokens else float("nan"),
            "num_captions": len(tokens)}


def nlg_scores(candidates: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus CIDEr-D (document frequencies from these references, as pycocoevalcap does) and
    BLEU-1..4 on PTB-tokenised captions, via metrics/cider.py and metrics/bleu.py.

    The captions are tokenised once for both metrics, as pycocoevalcap does: all references in
    order in one call, then all candidates in another."""
    from itertools import accumulate

    from metrics.bleu import bleu
    from metrics.cider import cider_d
    from metrics.ptb_tokenizer import ptb_tokenize

    flat = ptb_tokenize([r for refs in references for r in refs])
    ends = list(accumulate(len(refs) for refs in references))
    tokenized_refs = [flat[a:b] for a, b in zip([0, *ends[:-1]], ends)]
    tokenized = ptb_tokenize(candidates)
    cider, _ = cider_d(tokenized, tokenized_refs, tokenize=False)
    b, _ = bleu(tokenized, tokenized_refs, tokenize=False)
    return {"cider": float(cider), **{f"bleu_{n + 1}": float(v) for n, v in enumerate(b)}}


def count_over_context(judge, captions: list[str]) -> int:
    """How many captions are longer than the judge's text context (77 tokens for CLIP), counting
    the start / end tokens the judge adds: the judge reads only their beginning."""
    tok = judge._backend.tokenizer  # the judge's own tokenizer: the count must match what it truncates
    limit = judge.context_length
    if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # open_clip's SimpleTokenizer
        lengths = [len(tok.encode(c)) + 2 for c in captions]
    else:
        inner = getattr(tok, "tokenizer", tok)  # open_clip's HFTokenizer wraps a transformers one
        rows = inner(list(captions), add_special_tokens=True, verbose=False)["input_ids"] if captions else []
        eos = getattr(inner, "eos_token_id", None)
        lengths = [len(r) + (eos is not None and (not r or r[-1] != eos)) for r in rows]
    return sum(n > limit for n in lengths)


def _warn_missing(benchmark: str, missing: list, total: int) -> None:
    if missing:
        shown = ", ".join(map(str, missing[:MAX_IDS_SHOWN])) + (" ..." if len(missing) > MAX_IDS_SHOWN else "")
        logger.warning("WARNING [%s]: %d of %d images have no caption and count as wrong: %s", benchmark,
                       len(missing), total, shown)


def _pct(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else 100.0 * x


def _image_embeddings(data: BenchmarkData, key: str, judge, images: list, ids: list[str]):
    """The judge's embeddings of one benchmark's images, computed once per judge and image list."""
    memo = (key, f"{judge.name}|{getattr(judge, 'cache_key', '')}")
    if memo not in data._embeddings:
        data._embeddings[memo] = judge.embed_images(images, ids=ids, progress=True)
    return data._embeddings[memo]


def _wanted(data: BenchmarkData, eval_set: EvalSet | None, benchmarks: list[str] | None,
            num_distractors: int) -> set[str]:
    """The benchmarks to run: those asked for, checked against the data; or all with data."""
    wanted = set(benchmarks or [])
    images = eval_set is not None and eval_set.images is not None
    refs = eval_set is not None and eval_set.references is not None
    if not wanted:
        wanted = {b for b, ok in [("truematch", data.truematch is not None), ("rd100", images),
                                  ("clipscore", images), ("nlg", refs), ("imagecode", data.imagecode_data)] if ok}
        if not wanted:
            raise BenchmarkRequestError("nothing to evaluate: give --truematch, --references, --images or "
                                        "--imagecode-data (see --help)")
        if "rd100" in wanted and len(eval_set.ids) <= num_distractors:
            wanted.discard("rd100")
            logger.warning("note: skipping RD%d: the evaluated set (%s) is too small; lower --num-distractors to "
                           "run it", num_distractors + 1, eval_set.source)
    need_images = "--references (dataset with images), --images or --truematch"
    for b, ok, need in [("rd100", images, need_images), ("clipscore", images, need_images),
                        ("nlg", refs, "--references (or --truematch, whose rows carry COCO captions)"),
                        ("imagecode", data.imagecode is not None, "--imagecode-data and --imagecode-images")]:
        if b in wanted and not ok:
            raise BenchmarkRequestError(f"--benchmark {b} needs {need}")
    return wanted


def evaluate_captions(captions: dict[str, str], data: BenchmarkData, judge=None, *,
                      benchmarks: list[str] | None = None, num_distractors: int = 99, seed: int = 0,
                      captions_file: str | None = None) -> dict[str, Any]:
    """Run the benchmarks on ``{id: caption}`` and return the results.

    Args:
        captions: image id (or image file path, see :func:`~.captions.match_captions`) -> caption.
        data: the benchmark data (:func:`~.benchmarks.load_benchmarks`).
        judge: a loaded ``ClipJudge``, or :class:`JudgeSettings` to load one if a benchmark needs it.
        benchmarks: the benchmarks to run (None: every one whose data is given).
        num_distractors: random distractors per image of RD100 (99).
        seed: seed of the distractor sampling.
        captions_file: recorded in the results.

    Returns:
        A dict with ``benchmarks`` (run), one entry per benchmark (the module's output: ``truematch``,
        ``rd<k+1>``, ``clipscore``, ``imagecode``, ``nlg``), ``vocabulary``, ``missing`` (per benchmark,
        the ids without a caption), ``captions_outside_benchmarks``, ``judge`` and ``table`` (the
        paper's columns, R@1 and NLG scores in %). NaN values are None.

    Raises:
        BenchmarkRequestError: a benchmark asked for lacks its data, or nothing can be evaluated.
        ValueError, OSError: unreadable data (the message names the file, id or bag).
    """
    results: dict[str, Any] = {"captions_file": str(captions_file), "num_captions_in_file": len(captions)}
    table: dict[str, float | int | None] = {}
    missing_all: dict[str, list] = {}
    captions = match_captions(captions, data.known_ids())
    eval_set = data.eval_set(list(captions))
    wanted = _wanted(data, eval_set, benchmarks, num_distractors)
    results["benchmarks"] = sorted(wanted)
    tm, ic = data.truematch, data.imagecode
    used = set(tm.ids) if tm is not None and "truematch" in wanted else set()
    used |= set(eval_set.ids) if eval_set is not None and wanted & {"rd100", "clipscore", "nlg"} else set()
    used |= set(ic.ids) if ic is not None and "imagecode" in wanted else set()
    outside = [k for k in captions if k not in used]
    results["captions_outside_benchmarks"] = {"count": len(outside), "ids": outside[:MAX_IDS_SHOWN]}
    if outside:
        shown = ", ".join(outside[:MAX_IDS_SHOWN]) + (" ..." if len(outside) > MAX_IDS_SHOWN else "")
        logger.warning("note: %d of %d captions are for ids in none of the evaluated benchmarks and are not "
                       "scored: %s", len(outside), len(captions), shown)

    needs_judge = wanted & {"truematch", "rd100", "clipscore", "imagecode"}
    if (judge is None or isinstance(judge, JudgeSettings)) and needs_judge:
        judge = (judge or JudgeSettings()).load()
    if judge is not None and not isinstance(judge, JudgeSettings):
        results["judge"] = judge.name

    if "truematch" in wanted:
        out = load_metric("truematch").compute(
            predictions=[captions.get(i) for i in tm.ids], ids=tm.ids, bags=tm.bags, judge=judge, progress=True,
            image_embeddings=_image_embeddings(data, "truematch", judge, tm.images, tm.ids))
        _warn_missing("truematch", out["missing"], len(tm.ids))
        results["truematch"] = out
        missing_all["truematch"] = out["missing"]
        for s in tm.sizes:
            table[f"TM #{s}"] = _pct(out.get(f"recall_at_1_bag_{s}"))

    ids = eval_set.ids if eval_set is not None else None
    if wanted & {"rd100", "clipscore"}:
        img = _image_embeddings(data, eval_set.key, judge, eval_set.images, ids)
    if "rd100" in wanted:
        k = num_distractors
        if len(ids) - 1 < k:
            raise BenchmarkRequestError(f"RD{k + 1} needs at least {k + 1} images, the evaluated set has {len(ids)} "
                                        "(lower --num-distractors)")
        out = load_metric("self_retrieval").compute(
            predictions=[captions.get(i) for i in ids], image_embeddings=img, ids=ids, num_distractors=k,
            seed=seed, judge=judge, progress=True)
        _warn_missing(f"rd{k + 1}", out["missing"], len(ids))
        results[f"rd{k + 1}"] = {**out, "eval_set": eval_set.source}
        missing_all[f"rd{k + 1}"] = out["missing"]
        table[f"RD{k + 1}"] = _pct(out["recall_at_1"])
        table["ClipSc"] = out["clipsc"]

    if "clipscore" in wanted:
        refs = eval_set.references
        out = load_metric("clip_score").compute(
            predictions=[captions.get(i) for i in ids], image_embeddings=img, ids=ids,
            references=[refs[i] for i in ids] if refs is not None else None, judge=judge, progress=True)
        _warn_missing("clipscore", out["missing"], len(ids))
        results["clipscore"] = {**out, "eval_set": eval_set.source}
        missing_all["clipscore"] = out["missing"]
        table["CLIP-S"] = _pct(out["clip_score"])
        if "refclip_score" in out:
            table["RefCLIP-S"] = _pct(out["refclip_score"])

    if "imagecode" in wanted:
        out = load_metric("self_retrieval").compute(
            predictions=[captions.get(i) for i in ic.ids], image_sets=ic.image_sets, targets=ic.targets,
            image_set_ids=ic.image_set_ids, groups=ic.groups, judge=judge, progress=True)
        _warn_missing("imagecode", out["missing"], len(ic.ids))
        results["imagecode"] = out
        missing_all["imagecode"] = out["missing"]
        table["ImageCoDe"] = _pct(out["recall_at_1"])

    if "nlg" in wanted:
        refs = eval_set.references
        preds = [captions.get(i) for i in ids]
        missing = [i for i, p in zip(ids, preds) if p is None]
        _warn_missing("nlg", missing, len(ids))
        empty_refs = [i for i in ids if not refs.get(i)]
        if empty_refs:
            raise BenchmarkRequestError(f"no reference captions for ids {empty_refs[:MAX_IDS_SHOWN]}")
        out = nlg_scores([p if p is not None else "" for p in preds], [refs[i] for i in ids])
        out.update(num_captions=len(ids), num_missing=len(missing), missing=missing, eval_set=eval_set.source)
        results["nlg"] = out
        missing_all["nlg"] = missing
        table["CIDEr"] = _pct(out["cider"])
        table["BLEU-4"] = _pct(out["bleu_4"])

    vocab_ids = ids if ids is not None else list(captions)
    scored = [captions[i] for i in vocab_ids if i in captions]
    vocab = vocabulary_stats(scored)
    vocab["over"] = eval_set.source if ids is not None else "all captions in the file"
    results["vocabulary"] = vocab
    table.update({"vocab": vocab["vocab_size"], "words>=5": vocab["words_ge5"], "mean len": vocab["mean_length"]})
    if judge is not None and not isinstance(judge, JudgeSettings):
        scored_texts = [c for k, c in captions.items() if k in used]
        results["over_context"] = {"count": count_over_context(judge, scored_texts),
                                   "context_length": judge.context_length, "of": len(scored_texts)}
    results["table"] = table
    results["missing"] = missing_all
    from common import json_safe

    return json_safe(results)


def evaluate_file(path: str, data: BenchmarkData, judge=None, **kwargs) -> dict[str, Any]:
    """:func:`evaluate_captions` on a captions file (:func:`~.captions.read_captions`)."""
    return evaluate_captions(read_captions(path), data, judge, captions_file=str(path), **kwargs)
