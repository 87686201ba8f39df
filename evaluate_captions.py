"""Score a captions file on TrueMatch, RD100, CLIPScore, ImageCoDe and CIDEr-D / BLEU-4 (NDLB Sec. 3-5).

One command measures any captioner from a plain captions file (json / jsonl / csv: image id ->
caption). Retrieval metrics go through the project's `evaluate` modules (`metrics/truematch`,
`metrics/self_retrieval`, `metrics/clip_score`) and hence the one CLIP-scoring core
(`metrics/clip_judge.py`); CIDEr-D and BLEU through `metrics/cider.py` and `metrics/bleu.py`.

    python evaluate_captions.py --captions preds.json --truematch path/or/hub-id \\
        --references coco_karpathy/ --output results.json

Every image that a benchmark needs but the captions file lacks is reported by id and counted as
wrong (R@1) / zero (scores); captions for ids that no benchmark holds are counted and named;
nothing is silently dropped. ``--strict`` turns missing captions into an error. The output of
``inference.py`` (``image``, ``caption``) is read as it is: each image is matched to a benchmark
id by that id or by its file name (``000000000139.jpg``, ``COCO_val2014_000000000139.jpg``,
``<set>/img3.jpg`` for ImageCoDe).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent
BENCHMARKS = ("truematch", "rd100", "clipscore", "nlg", "imagecode")
_MAX_IDS_SHOWN = 20

__all__ = ["read_captions", "match_captions", "ImageFolder", "load_truematch", "load_eval_set", "vocabulary_stats", "nlg_scores",
           "evaluate_captions", "format_table", "build_parser", "main"]


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def _norm_id(x: Any) -> str:
    """Ids compare as strings; integer-like ids lose leading zeros ("000000123" == 123)."""
    s = str(x).strip()
    return str(int(s)) if s.isdigit() else s


_ID_KEYS = ("cocoid", "image_id", "id", "image")  # "image": inference.py's output (a path or URL)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key that appears twice (a plain parser keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears more than once in one JSON object; keep one caption per id")
        out[key] = value
    return out


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """Read a captions file (API contract 5) into ``{id: caption}``.

    Accepted: json ``{"<id>": "caption", ...}`` or a list of ``{"cocoid"|"image_id"|"id"|"image":
    id, "caption": str}``; jsonl with such records; csv (UTF-8, with or without the byte-order
    mark spreadsheets write) with a column ``image_id``, ``cocoid``, ``id`` or ``image`` and
    ``caption``. ``image`` is what ``inference.py`` writes (a file path or URL): such keys are
    matched to benchmark ids by :func:`match_captions`. A value that is a list of captions keeps
    its first one (counted and reported). An id given twice (in any format) is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    suffix = path.suffix.lower()
    line = 0
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                records = list(csv.DictReader(f))
        elif suffix == ".jsonl":
            records = []
            with open(path, encoding="utf-8") as f:
                for line, text in enumerate(f, 1):
                    if text.strip():
                        records.append(json.loads(text, object_pairs_hook=_unique_keys))
        else:
            records = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        where = f"{path}:{line}" if line else str(path)
        raise ValueError(f"{where}: not a valid {suffix.lstrip('.') or 'json'} captions file ({e})") from e
    except ValueError as e:  # a duplicate key
        raise ValueError(f"{f'{path}:{line}' if line else path}: {e}") from e

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
        k = _norm_id(k)
        if k in out:
            raise ValueError(f"{path}: id {k} has more than one caption")
        out[k] = v.strip()
    if lists:
        print(f"note: {lists} ids map to a list of captions; the first of each is scored", file=sys.stderr)
    if not out:
        raise ValueError(f"{path}: no captions")
    return out


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
_COCO_NAME = re.compile(r"^COCO_(?:train|val|test)\d{4}_(\d+)$")


def _file_ids(key: str) -> list[str]:
    """Ids an image file path or URL may stand for (none when its name has no image suffix): the
    name without the suffix (COCO 2014 names give the number; ``000000000139`` gives ``139``), then
    ``<folder>/<name>`` (ImageCoDe's ``<set>/img3``)."""
    name_path = urlparse(key).path if key.startswith(("http://", "https://")) else key
    parts = [p for p in re.split(r"[/\\]", name_path) if p]
    if not parts or Path(parts[-1]).suffix.lower() not in _IMAGE_SUFFIXES:
        return []
    stem = Path(parts[-1]).stem
    coco = _COCO_NAME.match(stem)
    ids = [_norm_id(coco.group(1) if coco else stem)]
    if len(parts) > 1:
        ids.append(f"{parts[-2]}/{stem}")
    return ids


def match_captions(captions: dict[str, str], known_ids: set[str] | None = None) -> dict[str, str]:
    """``{id: caption}`` with file-path keys (``inference.py``'s ``image`` column) replaced by the
    id they name: a key that is a benchmark id (in ``known_ids``) stays; otherwise its file name
    (see :func:`_file_ids`) is used, preferring a form in ``known_ids``. Two keys that end up as
    the same id are an error naming both."""
    known = known_ids or set()
    out: dict[str, str] = {}
    origin: dict[str, str] = {}
    for key, caption in captions.items():
        candidates = _file_ids(key) if key not in known else []
        target = next((c for c in candidates if c in known), candidates[0] if candidates else key)
        if target in out:
            raise ValueError(f"the captions file has two captions for id {target}: under {origin[target]!r} and "
                             f"{key!r}; keep one")
        out[target], origin[target] = caption, key
    return out


class ImageFolder:
    """Finds an image by id in a folder tree: ``<id>.<ext>``, ``%012d.jpg`` and the COCO 2014 names
    (``COCO_val2014_%012d.jpg``, ``COCO_train2014_%012d.jpg``), in any sub-folder."""

    EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"images folder not found: {self.root}")
        self._by_stem: dict[str, Path] = {}
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                p = Path(dirpath) / name
                if p.suffix.lower() in self.EXTS:
                    self._by_stem.setdefault(p.stem, p)

    def find(self, image_id: Any) -> Path:
        s = _norm_id(image_id)
        names = [s]
        if s.isdigit():
            i = int(s)
            names += [f"{i:012d}", f"COCO_val2014_{i:012d}", f"COCO_train2014_{i:012d}"]
        for name in names:
            if name in self._by_stem:
                return self._by_stem[name]
        raise FileNotFoundError(f"no image for id {s} in {self.root} (looked for {', '.join(n + '.jpg' for n in names)})")


def _check_bag(ids: list[str], where: str) -> None:
    """A bag lists distinct images (R@1 within a bag with one image twice is meaningless)."""
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ValueError(f"{where} holds image id(s) {', '.join(twice)} more than once ({ids}); a bag needs distinct "
                         "images: fix or drop that bag")


def load_truematch(source: str, sizes: list[int], images_dir: str | None = None):
    """TrueMatch bags from our dataset (contract 4: folder or Hub id, configs ``bags_<s>``) or the
    authors' format (``<s>.json`` lists of COCO ids + an images folder).

    Returns ``(ids, images, bags, references)``: unique image ids, their images (dicts or paths),
    bags as lists of ids, and ``{id: reference captions}`` (empty for the authors' format). A bag
    that holds an image twice is an error naming the file and the bag.
    """
    src = Path(source)
    ours = not src.exists() or any((src / f"bags_{s}").is_dir() for s in sizes) or not any(
        (src / f"{s}.json").is_file() for s in sizes)
    images: dict[str, Any] = {}
    refs: dict[str, list[str]] = {}
    bags: list[list[str]] = []
    if ours:
        import datasets

        for s in sizes:
            try:
                ds = datasets.load_dataset(str(source), f"bags_{s}", split="test")
            except Exception as e:
                raise FileNotFoundError(f"could not load TrueMatch config bags_{s} from {source!r}: {e}") from e
            ds = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
            for n, row in enumerate(ds):
                ids = [_norm_id(c) for c in row["cocoids"]]
                _check_bag(ids, f"{source} [bags_{s}] row {n} (bag_id {row.get('bag_id', n)})")
                bags.append(ids)
                for k, cid in enumerate(ids):
                    images.setdefault(cid, row["images"][k])
                    if row.get("captions"):
                        refs.setdefault(cid, list(row["captions"][k]))
    else:
        from datasets_scripts.truematch import read_authors_bags

        folder_path = images_dir or (src / "images" if (src / "images").is_dir() else None)
        if folder_path is None:
            raise ValueError(f"{source} is in the authors' format ({{3,5,7}}.json): give its images "
                             "folder with --truematch-images (COCO files, e.g. COCO_val2014_%012d.jpg)")
        folder = ImageFolder(folder_path)
        for s in sizes:
            f = src / f"{s}.json"
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found (asked for bag size {s}; see --bag-sizes)")
            for n, bag in enumerate(read_authors_bags(f)):
                ids = [_norm_id(c) for c in bag]
                _check_bag(ids, f"{f} bag {n}")
                bags.append(ids)
                for cid in ids:
                    if cid not in images:
                        images[cid] = str(folder.find(cid))
    ids = list(images)
    return ids, [images[i] for i in ids], bags, refs


def load_eval_set(references: str | None, split: str, images_dir: str | None, captions: dict[str, str],
                  truematch: tuple | None):
    """The image set for RD100 / CLIPScore / NLG: ``(ids, images or None, refs or None, source)``.

    Priority: ``--references`` (a COCO dataset folder / Hub id (contract 2) with images and
    captions, or a json ``{id: [captions]}`` with images from ``--images``); else ``--images`` with
    the captions file's ids; else the TrueMatch images (their COCO captions as references).
    """
    if references:
        ref_path = Path(references)
        if ref_path.is_file():
            try:
                data = json.loads(ref_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{ref_path}: not valid json ({e})") from e
            if not isinstance(data, dict):
                raise ValueError(f"{ref_path}: expected a json object {{id: [reference captions]}}")
            refs = {_norm_id(k): ([v] if isinstance(v, str) else list(v)) for k, v in data.items()}
            ids = list(refs)
            images = None
            if images_dir:
                folder = ImageFolder(images_dir)
                images = [str(folder.find(i)) for i in ids]
            return ids, images, refs, f"{ref_path.name} ({len(ids)} images)"
        import datasets
        from datasets_scripts.coco import load_coco

        dsd = load_coco(references)
        if split not in dsd:
            raise KeyError(f"split {split!r} not in {references} (has {list(dsd)}); see --split")
        ds = dsd[split]
        ids = [_norm_id(c) for c in ds["cocoid"]]
        refs = dict(zip(ids, (list(c) for c in ds["captions"])))
        if images_dir:
            folder = ImageFolder(images_dir)
            images = [str(folder.find(i)) for i in ids]
        else:
            images = ds.cast_column("image", datasets.Image(decode=False))["image"]
            absent = [i for i, im in zip(ids, images) if im is None]
            if absent:
                raise ValueError(f"{references} [{split}] has no image for ids {absent[:_MAX_IDS_SHOWN]}; "
                                 "give --images")
        return ids, images, refs, f"{references} [{split}] ({len(ids)} images)"
    if images_dir:
        folder = ImageFolder(images_dir)
        ids = list(captions)
        return ids, [str(folder.find(i)) for i in ids], None, f"{images_dir} ({len(ids)} captioned images)"
    if truematch is not None:
        ids, images, _, refs = truematch
        return ids, images, (refs or None), f"TrueMatch images ({len(ids)} images)"
    return None, None, None, None


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


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def _load_module(name: str):
    import evaluate

    return evaluate.load(str(ROOT / "metrics" / name))


def _warn_missing(benchmark: str, missing: list, total: int) -> None:
    if missing:
        shown = ", ".join(map(str, missing[:_MAX_IDS_SHOWN])) + (" ..." if len(missing) > _MAX_IDS_SHOWN else "")
        print(f"WARNING [{benchmark}]: {len(missing)} of {total} images have no caption and count as wrong: "
              f"{shown}", file=sys.stderr)


def _pct(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else 100.0 * x


def evaluate_captions(captions: dict[str, str], args: argparse.Namespace, judge=None) -> dict[str, Any]:
    """Run the requested benchmarks on ``{id: caption}``; returns the results dict (also the table)."""
    wanted = set(args.benchmark or [])
    auto = not wanted
    results: dict[str, Any] = {"captions_file": str(args.captions), "num_captions_in_file": len(captions)}
    table: dict[str, float | int | None] = {}
    missing_all: dict[str, list] = {}

    tm = None
    if args.truematch:
        tm = load_truematch(args.truematch, args.bag_sizes, args.truematch_images)
    elif "truematch" in wanted:
        raise SystemExit("error: --benchmark truematch needs --truematch (dataset folder, Hub id or authors' folder)")
    ic, ic_module = None, None
    if args.imagecode_data and args.imagecode_images and (auto or "imagecode" in wanted):
        ic_module = _load_module("self_retrieval")
        load_imagecode = sys.modules[type(ic_module).__module__].load_imagecode
        ic = load_imagecode(args.imagecode_data, args.imagecode_images)
    # the benchmarks' own ids first, then captions keyed by file name (inference.py) are matched to them
    known = set(tm[0]) if tm is not None else set()
    known |= {_norm_id(i) for i in ic["ids"]} if ic is not None else set()
    eval_set = load_eval_set(args.references, args.split, args.images, captions, tm) if args.references else None
    known |= set(eval_set[0]) if eval_set is not None else set()
    captions = match_captions(captions, known)
    ids, images, refs, source = eval_set or load_eval_set(None, args.split, args.images, captions, tm)
    if auto:
        wanted = {b for b, ok in [("truematch", tm is not None), ("rd100", images is not None),
                                  ("clipscore", images is not None), ("nlg", refs is not None),
                                  ("imagecode", bool(args.imagecode_data))] if ok}
        if not wanted:
            raise SystemExit("error: nothing to evaluate: give --truematch, --references, --images or "
                             "--imagecode-data (see --help)")
        if "rd100" in wanted and len(ids) <= args.num_distractors:
            wanted.discard("rd100")
            print(f"note: skipping RD{args.num_distractors + 1}: the evaluated set ({source}) is too small; "
                  "lower --num-distractors to run it", file=sys.stderr)
    for b, ok, need in [("rd100", images is not None, "--references (dataset with images), --images or --truematch"),
                        ("clipscore", images is not None, "--references (dataset with images), --images or --truematch"),
                        ("nlg", refs is not None, "--references (or --truematch, whose rows carry COCO captions)"),
                        ("imagecode", bool(args.imagecode_data and args.imagecode_images),
                         "--imagecode-data and --imagecode-images")]:
        if b in wanted and not ok:
            raise SystemExit(f"error: --benchmark {b} needs {need}")
    results["benchmarks"] = sorted(wanted)
    used = set(tm[0]) if tm is not None and "truematch" in wanted else set()
    used |= set(ids) if ids is not None and wanted & {"rd100", "clipscore", "nlg"} else set()
    used |= {_norm_id(i) for i in ic["ids"]} if ic is not None and "imagecode" in wanted else set()
    outside = [k for k in captions if k not in used]
    results["captions_outside_benchmarks"] = {"count": len(outside), "ids": outside[:_MAX_IDS_SHOWN]}
    if outside:
        shown = ", ".join(outside[:_MAX_IDS_SHOWN]) + (" ..." if len(outside) > _MAX_IDS_SHOWN else "")
        print(f"note: {len(outside)} of {len(captions)} captions are for ids in none of the evaluated benchmarks "
              f"and are not scored: {shown}", file=sys.stderr)

    if judge is None and wanted & {"truematch", "rd100", "clipscore", "imagecode"}:
        from metrics.clip_judge import ClipJudge

        judge = ClipJudge.from_pretrained(args.judge, backend=args.judge_backend, pretrained=args.judge_pretrained,
                                          device=args.device, batch_size=args.batch_size, cache_dir=args.cache_dir)
    if judge is not None:
        results["judge"] = judge.name

    if "truematch" in wanted:
        tm_ids, tm_images, bags, _ = tm
        out = _load_module("truematch").compute(
            predictions=[captions.get(i) for i in tm_ids], images=tm_images, ids=tm_ids, bags=bags,
            judge=judge, progress=True)
        _warn_missing("truematch", out["missing"], len(tm_ids))
        results["truematch"] = out
        missing_all["truematch"] = out["missing"]
        for s in args.bag_sizes:
            table[f"TM #{s}"] = _pct(out.get(f"recall_at_1_bag_{s}"))

    if "rd100" in wanted:
        k = args.num_distractors
        if len(ids) - 1 < k:
            raise SystemExit(f"error: RD{k + 1} needs at least {k + 1} images, the evaluated set has {len(ids)} "
                             "(lower --num-distractors)")
        out = _load_module("self_retrieval").compute(
            predictions=[captions.get(i) for i in ids], images=images, ids=ids, num_distractors=k,
            seed=args.seed, judge=judge, progress=True)
        _warn_missing(f"rd{k + 1}", out["missing"], len(ids))
        results[f"rd{k + 1}"] = {**out, "eval_set": source}
        missing_all[f"rd{k + 1}"] = out["missing"]
        table[f"RD{k + 1}"] = _pct(out["recall_at_1"])
        table["ClipSc"] = out["clip_score"]

    if "clipscore" in wanted:
        out = _load_module("clip_score").compute(
            predictions=[captions.get(i) for i in ids], images=images, ids=ids,
            references=[refs[i] for i in ids] if refs is not None else None, judge=judge, progress=True)
        _warn_missing("clipscore", out["missing"], len(ids))
        results["clipscore"] = {**out, "eval_set": source}
        missing_all["clipscore"] = out["missing"]
        table["CLIP-S"] = _pct(out["clip_score"])
        if "refclip_score" in out:
            table["RefCLIP-S"] = _pct(out["refclip_score"])

    if "imagecode" in wanted:
        out = ic_module.compute(predictions=[captions.get(_norm_id(i)) for i in ic["ids"]], image_sets=ic["image_sets"],
                             targets=ic["targets"], image_set_ids=ic["image_set_ids"], groups=ic["groups"],
                             judge=judge, progress=True)
        _warn_missing("imagecode", out["missing"], len(ic["ids"]))
        results["imagecode"] = out
        missing_all["imagecode"] = out["missing"]
        table["ImageCoDe"] = _pct(out["recall_at_1"])

    vocab_ids = ids if ids is not None else list(captions)
    if "nlg" in wanted:
        preds = [captions.get(i) for i in ids]
        missing = [i for i, p in zip(ids, preds) if p is None]
        _warn_missing("nlg", missing, len(ids))
        empty_refs = [i for i in ids if not refs.get(i)]
        if empty_refs:
            raise SystemExit(f"error: no reference captions for ids {empty_refs[:_MAX_IDS_SHOWN]}")
        out = nlg_scores([p if p is not None else "" for p in preds], [refs[i] for i in ids])
        out.update(num_captions=len(ids), num_missing=len(missing), missing=missing, eval_set=source)
        results["nlg"] = out
        missing_all["nlg"] = missing
        table["CIDEr"] = _pct(out["cider"])
        table["BLEU-4"] = _pct(out["bleu_4"])

    scored = [captions[i] for i in vocab_ids if i in captions]
    vocab = vocabulary_stats(scored)
    vocab["over"] = source if ids is not None else "all captions in the file"
    results["vocabulary"] = vocab
    table.update({"vocab": vocab["vocab_size"], "words>=5": vocab["words_ge5"], "mean len": vocab["mean_length"]})
    results["table"] = table
    results["missing"] = missing_all
    return _finite(results)


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN / infinite number replaced by None (JSON has no NaN: it is written null)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def format_table(table: dict[str, float | int | None]) -> str:
    """One header row and one value row, like the paper's tables (R@1 and NLG scores in %)."""
    cells = []
    for k, v in table.items():
        if v is None:
            s = "-"
        elif isinstance(v, int):
            s = str(v)
        else:
            s = f"{v:.1f}" if k != "mean len" else f"{v:.2f}"
        cells.append((k, s))
    widths = [max(len(k), len(s)) for k, s in cells]
    head = " | ".join(k.rjust(w) for (k, _), w in zip(cells, widths))
    vals = " | ".join(s.rjust(w) for (_, s), w in zip(cells, widths))
    return f"{head}\n{'-' * len(head)}\n{vals}"


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(obj), f, indent=2, default=str, allow_nan=False)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate_captions.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + """

Benchmarks (--benchmark; default: every one whose data is given):
  truematch  R@1 within TrueMatch bags of 3/5/7 similar images          needs --truematch
  rd100      R@1 against 99 random distractors from the evaluated set  needs an image set (*)
  clipscore  CLIP-S (+ RefCLIP-S with references), Hessel et al. 2021  needs an image set (*)
  nlg        CIDEr-D and BLEU-1..4 against reference captions          needs references (*)
  imagecode  R@1 within ImageCoDe's sets of 10 images                  needs --imagecode-data/-images
(*) the evaluated set is, in this order: --references (a COCO dataset folder / Hub id, split
    --split, with images and captions; or a json {id: [captions]} plus --images), else --images
    with the captions file's ids, else the images and COCO captions of the TrueMatch bags.
Vocabulary size, words used >= 5 times and mean length are computed on the evaluated set.""",
        epilog="""examples:
  python evaluate_captions.py --captions preds.json --truematch truematch/ --references coco/
  python evaluate_captions.py --captions preds.jsonl --benchmark truematch \\
      --truematch authors_bags/ --truematch-images val2014/ --output results.json
  python evaluate_captions.py --captions preds.csv --benchmark rd100 nlg --references refs.json \\
      --images test_images/ --judge ViT-B-32 --judge-pretrained openai""")
    p.add_argument("--captions", required=True, help="captions file: json {id: caption} or list of "
                   "{cocoid|image_id, caption}, jsonl records, or csv with image_id|cocoid,caption")
    p.add_argument("--benchmark", nargs="+", choices=BENCHMARKS, metavar="NAME",
                   help=f"benchmarks to run, any of {', '.join(BENCHMARKS)} (default: all with data)")
    g = p.add_argument_group("data")
    g.add_argument("--truematch", metavar="SRC", help="TrueMatch: our dataset (folder or Hub id, configs "
                   "bags_3/5/7) or the authors' folder with 3.json 5.json 7.json (lists of COCO ids)")
    g.add_argument("--truematch-images", metavar="DIR", help="images folder for the authors' format "
                   "(COCO_val2014_%%012d.jpg or %%012d.jpg; default: SRC/images)")
    g.add_argument("--bag-sizes", nargs="+", type=int, default=[3, 5, 7], metavar="S", help="TrueMatch bag sizes "
                   "(default: 3 5 7)")
    g.add_argument("--references", metavar="SRC", help="references: a COCO dataset folder or Hub id "
                   "(datasets_scripts.coco; save_to_disk or parquet) or a json {id: [captions]}")
    g.add_argument("--split", default="test", help="split of a --references dataset (default: test)")
    g.add_argument("--images", metavar="DIR", help="images folder for RD100 / CLIPScore (<id>.jpg, "
                   "%%012d.jpg or COCO_*_%%012d.jpg, searched recursively)")
    g.add_argument("--imagecode-data", metavar="JSON", help="ImageCoDe descriptions, e.g. valid_data.json; "
                   "caption ids are '<set folder>/img<i>'")
    g.add_argument("--imagecode-images", metavar="DIR", help="ImageCoDe image-sets folder (<set>/img<i>.jpg)")
    g = p.add_argument_group("judge (the CLIP model that scores retrieval)")
    g.add_argument("--judge", default="openai/clip-vit-base-patch32", help="transformers CLIP id or folder, "
                   "open_clip name (with --judge-pretrained) or open_clip folder (default: %(default)s)")
    g.add_argument("--judge-backend", default="auto", choices=["auto", "transformers", "open_clip"])
    g.add_argument("--judge-pretrained", metavar="TAG", help="open_clip pretrained tag, e.g. openai")
    g.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    g.add_argument("--batch-size", type=int, default=64, help="judge batch size (default: 64)")
    g.add_argument("--cache-dir", metavar="DIR", help="cache image embeddings here (keyed by judge and image id)")
    g = p.add_argument_group("RD100")
    g.add_argument("--num-distractors", type=int, default=99, help="random distractors per image (default: 99)")
    g.add_argument("--seed", type=int, default=0, help="seed of the distractor sampling (default: 0)")
    g = p.add_argument_group("output")
    g.add_argument("--output", metavar="JSON", help="write all results (with per-benchmark missing ids) here")
    g.add_argument("--strict", action="store_true", help="exit with status 1 when any needed caption is missing")
    return p


def _judge_problem(name: str) -> str | None:
    """Why ``--judge`` names neither a folder, a Hub repo nor an open_clip model, or None."""
    if os.path.exists(name) or name.startswith("hf-hub:"):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return (f"--judge {name}: no such folder, and not a Hub repo id or open_clip model name; give an existing "
                "folder, a Hub id (openai/clip-vit-base-patch32) or an open_clip name (ViT-B-32)")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _judge_problem(args.judge)
    if problem:
        parser.error(problem)
    try:
        captions = read_captions(args.captions)
        results = evaluate_captions(captions, args)
    except (OSError, ValueError, KeyError) as e:  # OSError: a missing file, an unloadable judge or image
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results["table"]))
    if args.output:
        _write_json_atomic(Path(args.output), results)
        print(f"wrote {args.output}")
    n_missing = sum(len(v) for v in results["missing"].values())
    if args.strict and n_missing:
        print(f"error: {n_missing} needed captions are missing (--strict)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
