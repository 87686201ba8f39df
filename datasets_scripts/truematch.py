"""TrueMatch and training-bag mining, the files: NDLB paper Sec. 3.1 and App. B. The mining itself
(Alg. 1 and 2, B.2: pure functions on embeddings) is ``datasets_scripts.truematch_mining``; this
module computes the embeddings, writes the results and is the command line.

Pipeline (``python -m datasets_scripts.truematch build``):

1. :func:`multimodal_embeddings` (Alg. 1 l.4-8): for every image, ``m = concat(z, t)`` with ``z``
   the normalised CLIP image embedding and ``t`` the normalised mean of the CLIP text embeddings
   of its captions. Computed in chunks that are cached on disk (a rerun reuses finished chunks).
2. ``knn``, ``candidate_bags`` / ``bags_from_knn`` (Alg. 1), ``curate`` (Alg. 2) and
   ``training_bags`` (App. B.2) from ``truematch_mining`` (re-exported here).
3. :func:`write_truematch`: the TrueMatch folder; the ``training-bags`` command: the training-bag
   files (both in docs/formats.md).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import string
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from publishing.citations import NDLB as NDLB_CITATION
from common import read_json, size_category, write_bytes, write_json, write_text
from datasets_scripts.truematch_mining import (DEFAULT_MAX_BLOCK_BYTES, auto_block_size, bags_from_knn,
                                               candidate_bags, curate, knn, knn_reference, lo_bits,
                                               search_error_bound, split_unit_rows, training_bags,
                                               training_bags_from_knn)
from trainers.bags import check_distinct_bag

logger = logging.getLogger(__name__)

CARD_TEMPLATE = Path(__file__).with_name("templates") / "truematch_card.md"
CITATION = NDLB_CITATION


# ---------------------------------------------------------------------------------------------
# Multimodal embeddings (Alg. 1 l.4-8), cached on disk
# ---------------------------------------------------------------------------------------------

def _captions_hash(dataset, captions_column: str) -> str:
    h = hashlib.sha256()
    for batch in dataset.select_columns([captions_column]).iter(batch_size=4096):
        h.update(json.dumps(batch[captions_column]).encode())
    return h.hexdigest()[:16]


def multimodal_embeddings(dataset, judge, *, cache_dir: str | os.PathLike | None = None, chunk_size: int = 512,
                          image_column: str = "image", captions_column: str = "captions",
                          id_column: str = "cocoid", progress: bool = True) -> torch.Tensor:
    """Alg. 1 l.4-8: ``m = concat(normalised image embedding, normalised mean caption embedding)``.

    Args:
        dataset: a `datasets.Dataset` with an image column (decoded or not), a list-of-captions
            column and an id column (docs/formats.md: COCO dataset).
        judge: a `metrics.clip_judge.ClipJudge` (``embed_images`` / ``embed_texts``).
        cache_dir: folder for finished chunks (``chunk-XXXXX.npy``, written atomically) under a
            key of (judge name, ids, captions, chunk size); a rerun loads finished chunks and
            computes only the rest. None = no cache.
        chunk_size: rows embedded per chunk (and per cache file).
        progress: tqdm bar over chunks.

    Returns:
        (N, 2d) float32 tensor on CPU (each half has unit norm).
    """
    from datasets import Image

    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    ids = dataset[id_column]
    folder = None
    if cache_dir is not None:
        from datasets_scripts.coco import fingerprint_ids

        key = hashlib.sha256(json.dumps([getattr(judge, "cache_key", judge.name), fingerprint_ids(ids), _captions_hash(dataset, captions_column),
                                         chunk_size]).encode()).hexdigest()[:16]
        folder = Path(cache_dir) / f"mm-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "meta.json"
        if not meta.exists():
            write_json(meta, {"judge": judge.name, "n": n, "chunk_size": chunk_size, "id_column": id_column,
                              "first_ids": list(ids[:5])}, indent=None)
    raw = dataset.cast_column(image_column, Image(decode=False)) if isinstance(
        dataset.features.get(image_column), Image) else dataset
    parts = []
    for c, s in enumerate(tqdm(range(0, n, chunk_size), desc="Multimodal embeddings", unit="chunk",
                               disable=not progress)):
        path = folder / f"chunk-{c:05d}.npy" if folder is not None else None
        if path is not None and path.exists():
            parts.append(torch.from_numpy(np.load(path)))
            continue
        rows = raw[s: s + chunk_size]
        missing = [ids[s + j] for j, im in enumerate(rows[image_column]) if im is None]
        if missing:
            raise ValueError(f"images missing for {id_column} {missing[:20]} (imported with --allow-missing?); "
                             "drop these rows (dataset.filter) or fix the images first")
        caps = rows[captions_column]
        empty = [ids[s + j] for j, cs in enumerate(caps) if not cs]
        if empty:
            raise ValueError(f"no captions for {id_column} {empty[:20]}")
        z = F.normalize(judge.embed_images(rows[image_column]).float(), dim=-1)  # (C, d)
        flat = [t for cs in caps for t in cs]
        owner = torch.repeat_interleave(torch.arange(len(caps)), torch.tensor([len(cs) for cs in caps]))
        t_all = judge.embed_texts(flat).float()  # (sum captions, d)
        t = torch.zeros(len(caps), t_all.shape[1]).index_add_(0, owner, t_all)  # sum; mean = same direction
        m = torch.cat([z, F.normalize(t, dim=-1)], dim=1)  # (C, 2d)
        if path is not None:
            buf = io.BytesIO()
            np.save(buf, m.numpy())
            write_bytes(path, buf.getvalue())
        parts.append(m)
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# TrueMatch dataset folder (docs/formats.md: TrueMatch folder) and authors' format
# ---------------------------------------------------------------------------------------------

def bag_features():
    """`datasets.Features` of a TrueMatch config (one row per bag)."""
    from datasets import Features, Image, List, Value

    return Features({"bag_id": Value("int64"), "cocoids": List(Value("int64")), "images": List(Image()),
                     "captions": List(List(Value("string"))), "alpha": Value("float64")})


def write_bags_parquet(path: Path, dataset, bags: list[list[int]], alpha: Sequence[float],
                       bag_ids: Sequence[int] | None = None, *, embed_images: bool = True,
                       image_column: str = "image", captions_column: str = "captions", id_column: str = "cocoid",
                       progress: bool = False) -> None:
    """Write one config's bags (row indices into ``dataset``) as a parquet file, atomically."""
    from datasets import Image
    from datasets.arrow_writer import ParquetWriter

    raw = dataset.cast_column(image_column, Image(decode=False))
    bag_ids = list(range(len(bags))) if bag_ids is None else list(bag_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = ParquetWriter(features=bag_features(), path=str(tmp), embed_local_files=embed_images)
    try:
        batch = 32
        for s in tqdm(range(0, len(bags), batch), desc=f"Writing {path.parent.name}", disable=not progress):
            rows = {"bag_id": [], "cocoids": [], "images": [], "captions": [], "alpha": []}
            for b, a, bid in zip(bags[s: s + batch], alpha[s: s + batch], bag_ids[s: s + batch]):
                got = raw[[int(r) for r in b]]
                images = []
                for cid, im in zip(got[id_column], got[image_column]):
                    if im is None:
                        raise ValueError(f"bag {bid}: image of {id_column} {cid} is missing")
                    if im.get("bytes") is not None:
                        im = {"bytes": im["bytes"], "path": os.path.basename(im.get("path") or f"{cid:012d}.jpg")}
                    images.append(im)
                rows["bag_id"].append(int(bid))
                rows["cocoids"].append([int(c) for c in got[id_column]])
                rows["images"].append(images)
                rows["captions"].append([list(c) for c in got[captions_column]])
                rows["alpha"].append(float(a))
            writer.write_batch(rows)
        writer.finalize()
    finally:
        writer.close()
    os.replace(tmp, path)


def render_card(info: dict[str, Any]) -> str:
    """The README.md dataset card of a TrueMatch folder from its ``mining_info.json`` dict."""
    sizes = sorted(int(s) for s in info["sizes"])
    configs = "\n".join(f"- config_name: bags_{s}\n  data_files:\n  - split: test\n    path: bags_{s}/test-*.parquet"
                        for s in sizes)
    review = info.get("review") or {}
    rows = []
    for s in sizes:
        r = review.get(str(s))
        rows.append(f"| bags_{s} | {s} | {info['candidates'][str(s)]} | {info['curated'][str(s)]} | "
                    + (f"{r['kept']} (dropped {r['dropped']}, undecided {r['undecided']}: {r['undecided_policy']})"
                       if r else "not reviewed") + " |")
    review_text = ("Bags were filtered by hand with the review page (`python -m datasets_scripts.review_bags`), "
                   "as in the paper (Sec. 3.1); the decisions are in `review/`." if review else
                   "These bags are not yet filtered by hand. The paper keeps only bags that require "
                   "fine-grained discrimination (e.g. 680 -> 254 bags of size 3): run "
                   "`python -m datasets_scripts.review_bags` on this folder, then `apply`.")
    cut = []
    if info.get("min_alpha") is not None:
        cut.append(f"alpha >= {info['min_alpha']}")
    if info.get("max_bags") is not None:
        cut.append(f"at most {info['max_bags']} bags per size (the highest alpha)")
    template = string.Template(CARD_TEMPLATE.read_text(encoding="utf-8"))
    return template.substitute(
        configs=configs, counts_table="\n".join(rows), judge=info["judge"], split=info["split"],
        n_images=info["n_images"], captions_column=info.get("captions_column", "captions"), sizes=", ".join(map(str, sizes)), review_text=review_text,
        cutoff=("; then kept " + " and ".join(cut)) if cut else "", citation=CITATION,
        first_size=sizes[len(sizes) // 2], size_category=size_category(_largest_config(info, review)))


def _largest_config(info: dict[str, Any], review: dict[str, Any]) -> int:
    """The number of bags of the largest config (after the review, where there was one)."""
    return max([review[s]["kept"] if s in review else info["curated"][s] for s in info["curated"]], default=0)


def write_truematch(out_dir: str | os.PathLike, dataset, curated: dict[int, tuple[list[list[int]], list[float]]],
                    info: dict[str, Any], *, embed_images: bool = True, captions_column: str = "captions",
                    progress: bool = True) -> Path:
    """Write a TrueMatch folder (docs/formats.md): per size ``bags_{s}/test-00000-of-00001.parquet``,
    the authors' ``{s}.json`` (lists of COCO ids) and ``alpha_{s}.json``, ``mining_info.json`` and
    the README.md card. ``curated[s] = (bags as row indices into dataset, alphas)``."""
    out = Path(out_dir)
    ids = dataset["cocoid"]
    for s, (bags, alpha) in sorted(curated.items()):
        write_bags_parquet(out / f"bags_{s}" / "test-00000-of-00001.parquet", dataset, bags, alpha,
                           embed_images=embed_images, captions_column=captions_column, progress=progress)
        write_json(out / f"{s}.json", [[int(ids[r]) for r in b] for b in bags], indent=None)
        write_json(out / f"alpha_{s}.json", [float(a) for a in alpha], indent=None)
    write_json(out / "mining_info.json", info)
    write_text(out / "README.md", render_card(info))
    return out


def read_authors_bags(path: str | os.PathLike) -> list[list[int]]:
    """Read an authors'-format bag file (``{s}.json``: list of bags, each a list of COCO ids)."""
    bags = read_json(path, "bag file", "a JSON list of bags, each a list of integer COCO ids")
    if not isinstance(bags, list) or not all(isinstance(b, list) and all(isinstance(c, int) for c in b) for b in bags):
        raise ValueError(f"{path}: expected a JSON list of bags, each a list of integer COCO ids")
    for k, bag in enumerate(bags):
        check_distinct_bag(bag, f"{path}: bag {k}")
    return bags


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _load_rows_and_embeddings(args, out: Path):
    from datasets_scripts.coco import concat_splits, load_coco

    dataset = concat_splits(load_coco(args.dataset), args.split)
    if args.embeddings:
        m = torch.from_numpy(np.load(args.embeddings))
        if m.shape[0] != len(dataset):
            raise ValueError(f"{args.embeddings} has {m.shape[0]} rows but split {args.split!r} has {len(dataset)}")
        return dataset, m, f"precomputed:{Path(args.embeddings).name}"
    from metrics.clip_judge import ClipJudge

    judge = ClipJudge.from_pretrained(args.judge, device=args.device, batch_size=args.batch_size)
    cache = Path(args.cache_dir) if args.cache_dir else out / ".cache"
    m = multimodal_embeddings(dataset, judge, cache_dir=cache, chunk_size=args.embed_chunk,
                              captions_column=args.captions_column)
    return dataset, m, judge.name


def _cmd_build(args) -> int:
    out = Path(args.out)
    if (out / "README.md").exists():
        if not (out / "mining_info.json").exists():
            raise FileExistsError(f"{out} holds a README.md but is not a TrueMatch folder; choose another --out")
        if not args.overwrite:
            raise FileExistsError(f"{out} already holds a TrueMatch folder; pass --overwrite or choose another --out")
        for old in [*out.glob("bags_*"), *out.glob("*.json"), out / "README.md"]:  # keep the embedding cache
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    sizes = sorted(set(args.sizes))
    dataset, m, judge_name = _load_rows_and_embeddings(args, out)
    t0 = time.time()
    sims, idx = knn(m, max(sizes) - 1, device=args.device, progress=True)
    curated, info_c, info_k = {}, {}, {}
    for s in sizes:
        bags, alpha = bags_from_knn(sims, idx, s)
        kept, pos = curate(bags, alpha, return_indices=True)
        a = alpha[pos].tolist()
        keep = [j for j in range(len(kept)) if args.min_alpha is None or a[j] >= args.min_alpha]
        keep = keep[: args.max_bags] if args.max_bags is not None else keep
        curated[s] = ([kept[j] for j in keep], [a[j] for j in keep])
        info_c[str(s)], info_k[str(s)] = len(bags), len(keep)
        print(f"bags of {s}: {len(bags)} candidates -> {len(kept)} curated -> {len(keep)} kept"
              + (f" (alpha {a[keep[0]]:.4f} .. {a[keep[-1]]:.4f})" if keep else ""))
    info = {"judge": judge_name, "dataset": str(args.dataset), "split": args.split, "n_images": len(dataset),
            "captions_column": args.captions_column,
            "sizes": sizes, "candidates": info_c, "curated": info_k, "min_alpha": args.min_alpha,
            "max_bags": args.max_bags, "mining_seconds": round(time.time() - t0, 2), "review": None}
    write_truematch(out, dataset, curated, info, embed_images=not args.no_embed_images,
                    captions_column=args.captions_column)
    print(f"wrote {out}")
    return 0


def _cmd_training_bags(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset, m, judge_name = _load_rows_and_embeddings(args, out)
    _, idx = knn(m, min(args.top_k, len(dataset) - 1), device=args.device, progress=True)
    ids = dataset["cocoid"]
    for s in sorted(set(args.sizes)):
        bags, stats = training_bags_from_knn(idx, s, seed=args.seed, leftover=args.leftover, return_stats=True)
        path = out / f"train_bags_{s}.json"
        write_json(path, {"bag_size": s, "cocoids": [[int(ids[r]) for r in b] for b in bags], "split": args.split,
                          "judge": judge_name, **stats}, indent=None)
        print(f"{path}: {stats['n_hard_bags']} hard + {stats['n_random_bags']} random bags; "
              f"{stats['n_unplaced']} images could not be placed in a hard bag, {stats['n_dropped']} sit out")
    return 0


TRUEMATCH_SIZES = [3, 5, 7]  # the paper's TrueMatch bag sizes (Sec. 3.1)
# BagCurri's sizes (App. B.3, Table 10): the authors' egg/zoo/emergent_captioner/finetuning/configs/sr.yml
# (commit 3db9c82), neg_mining.curricullum {3: 2, 8: 3, 10: 5, 12: 7, 14: 10, 17: 15, 20: 20}
TRAINING_SIZES = [2, 3, 5, 7, 10, 15, 20]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m datasets_scripts.truematch``."""
    p = argparse.ArgumentParser(prog="python -m datasets_scripts.truematch",
                                description="Mine TrueMatch bags (NDLB Alg. 1 + 2) and SR training bags (App. B.2).")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, split: str, sizes: list[int]):
        sp.add_argument("--dataset", required=True, help="COCO dataset folder (datasets_scripts.coco) or Hub id")
        sp.add_argument("--split", default=split, help=f"split(s) to mine, '+'-joined in this order (default {split})")
        sp.add_argument("--judge", default="openai/clip-vit-base-patch32",
                        help="CLIP judge: Hub id or folder (ClipJudge.from_pretrained)")
        sp.add_argument("--captions-column", default="captions",
                        help="list-of-captions column to embed (e.g. HolisticCap captions, as the paper)")
        sp.add_argument("--embeddings", help="precomputed (N, D) .npy multimodal embeddings instead of --judge")
        sp.add_argument("--sizes", type=int, nargs="+", default=list(sizes),
                        help=f"bag sizes (default {' '.join(map(str, sizes))})")
        sp.add_argument("--out", required=True, help="output folder")
        sp.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available for the judge, "
                        "cpu for the search)")
        sp.add_argument("--batch-size", type=int, default=64, help="judge batch size")
        sp.add_argument("--embed-chunk", type=int, default=512, help="rows per cached embedding chunk")
        sp.add_argument("--cache-dir", help="embedding cache (default OUT/.cache); reruns reuse finished chunks")

    b = sub.add_parser("build", help="TrueMatch folder: curated bags per size (parquet + card + {s}.json)")
    common(b, "test+val", TRUEMATCH_SIZES)
    b.add_argument("--min-alpha", type=float, default=None, help="keep only curated bags with alpha >= this")
    b.add_argument("--max-bags", type=int, default=None, help="keep at most this many curated bags per size")
    b.add_argument("--no-embed-images", action="store_true", help="store image paths instead of bytes")
    b.add_argument("--overwrite", action="store_true", help="replace an existing TrueMatch folder")
    b.set_defaults(func=_cmd_build)

    t = sub.add_parser("training-bags", help="disjoint hard training bags (a training-bag file per size)")
    common(t, "train", TRAINING_SIZES)
    t.add_argument("--top-k", type=int, default=200, help="neighbours considered per query (paper: 200)")
    t.add_argument("--seed", type=int, default=0, help="query order (use one seed per epoch)")
    t.add_argument("--leftover", choices=["random", "drop"], default="random",
                   help="images not placed in a hard bag: random bags (default) or sit out the epoch")
    t.set_defaults(func=_cmd_training_bags)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if min(args.sizes) < 2:
        p.error("bag sizes must be >= 2")
    try:
        return args.func(args)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


__all__ = ["DEFAULT_MAX_BLOCK_BYTES", "auto_block_size", "bag_features", "bags_from_knn", "build_parser",
           "candidate_bags", "curate", "knn", "knn_reference", "lo_bits", "main", "multimodal_embeddings",
           "read_authors_bags", "render_card", "search_error_bound", "split_unit_rows", "training_bags",
           "training_bags_from_knn", "write_bags_parquet", "write_truematch"]

if __name__ == "__main__":
    sys.exit(main())
