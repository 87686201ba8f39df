"""COCO captions with the Karpathy split as a `datasets.DatasetDict` (docs/formats.md: COCO dataset).

The NDLB paper trains on COCO's Karpathy train split (113k images incl. "restval") and builds
TrueMatch from the 10k Karpathy val + test images (paper Sec. 3.1). This module turns a COCO
images folder and Karpathy's `dataset_coco.json` into a DatasetDict with splits "train", "val",
"test" and columns

    cocoid (int64), image (datasets.Image()), captions (list[str], 5+), split (str)

`split` keeps the Karpathy label of the row (so "restval" rows inside "train" stay recognisable).

Missing or unreadable images are never dropped silently: by default the import stops with a
`MissingImagesError` that names the COCO ids (and writes them to `import_report.json`); with
`allow_missing=True` (`--allow-missing`) the rows are kept with `image=None` and counted in the
report. A row with `image is None` is the flag.

Storage: parquet (default) keeps `image` path-backed (absolute paths into the COCO folder), which
is small and fast; `embed_images=True` stores the JPEG bytes so the folder is self-contained.
`save_to_disk` ("arrow" format) always embeds the images: datasets 5 embeds local files there.

    python -m datasets_scripts.coco --images COCO_DIR --karpathy dataset_coco.json --out coco_karpathy
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Literal

import datasets
from datasets import DatasetDict, Features, Image, List, Value
from tqdm.auto import tqdm

from common import not_found, read_json, write_json, write_text

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
KARPATHY_LABELS = ("train", "restval", "val", "test")
FEATURES = Features({
    "cocoid": Value("int64"),
    "image": Image(),
    "captions": List(Value("string")),
    "split": Value("string"),
})
OPTIONS_FILE = "_import_options.json"
REPORT_FILE = "import_report.json"
_ERROR_LIST_LEN = 20


class MissingImagesError(RuntimeError):
    """Some images of the Karpathy json are missing or unreadable (ids in `.missing` / `.corrupt`)."""

    def __init__(self, missing: list[int], corrupt: dict[int, str], total: int, report_path: str | None = None):
        self.missing, self.corrupt = missing, corrupt
        bad = len(missing) + len(corrupt)
        more_m = " ..." if len(missing) > _ERROR_LIST_LEN else ""
        more_c = " ..." if len(corrupt) > _ERROR_LIST_LEN else ""
        msg = (f"{bad} of {total} COCO images are missing or unreadable "
               f"({len(missing)} missing: {missing[:_ERROR_LIST_LEN]}{more_m}; "
               f"{len(corrupt)} corrupt: {list(corrupt)[:_ERROR_LIST_LEN]}{more_c}).")
        if report_path:
            msg += f" The full list is in {report_path}."
        msg += (" Fix the images folder (--images) or pass --allow-missing (allow_missing=True) to keep "
                "these rows with image=None.")
        super().__init__(msg)


# ---------------------------------------------------------------------------------------------
# Reading the Karpathy json and finding the images
# ---------------------------------------------------------------------------------------------

def read_karpathy(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate Karpathy's `dataset_coco.json`; returns its "images" records in file order."""
    path = Path(path)
    data = read_json(path, "Karpathy split file", "Karpathy's dataset_coco.json")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected a JSON object with an 'images' list (Karpathy's dataset_coco.json)")
    seen: set[int] = set()
    for i, rec in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        for key in ("cocoid", "filename", "split", "sentences"):
            if key not in rec:
                raise ValueError(f"{where} (cocoid {rec.get('cocoid', '?')}) has no '{key}' field")
        if rec["split"] not in KARPATHY_LABELS:
            raise ValueError(f"{where} (cocoid {rec['cocoid']}): unknown split {rec['split']!r}; "
                             f"expected one of {KARPATHY_LABELS}")
        if rec["cocoid"] in seen:
            raise ValueError(f"{where}: duplicate cocoid {rec['cocoid']}")
        seen.add(rec["cocoid"])
        if not all("raw" in s for s in rec["sentences"]):
            raise ValueError(f"{where} (cocoid {rec['cocoid']}): a sentence has no 'raw' text")
    return data["images"]


def image_candidates(images_dir: Path, record: dict[str, Any]) -> list[Path]:
    """Where a record's image may live: `DIR/filepath/filename`, `DIR/filename`, or 2017 names
    (`DIR/{train2017,val2017}/%012d.jpg`, `DIR/%012d.jpg`)."""
    name, sub, cid = record["filename"], record.get("filepath", ""), int(record["cocoid"])
    short = f"{cid:012d}.jpg"
    return [images_dir / sub / name, images_dir / name, images_dir / "train2017" / short,
            images_dir / "val2017" / short, images_dir / short]


def check_image(path: Path, verify: Literal["none", "header", "full"] = "header") -> str | None:
    """None if the image at `path` is readable, else a short reason."""
    if verify == "none":
        return None
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            if verify == "full":
                im.load()
            else:
                im.verify()
    except Exception as e:  # PIL raises many types for bad files; we report, never crash
        return f"{type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# Building the DatasetDict
# ---------------------------------------------------------------------------------------------

def build_coco(images_dir: str | os.PathLike, karpathy_json: str | os.PathLike, *,
               restval: Literal["train", "restval"] = "train", allow_missing: bool = False,
               verify: Literal["none", "header", "full"] = "header", workers: int = 8,
               progress: bool = True, report_path: str | os.PathLike | None = None,
               ) -> tuple[DatasetDict, dict[str, Any]]:
    """Build the Karpathy-split COCO DatasetDict (path-backed images) and an import report.

    Args:
        images_dir: COCO images folder (with `train2014/`, `val2014/`, or flat).
        karpathy_json: Karpathy's `dataset_coco.json`.
        restval: "train" puts the "restval" images into train (as the paper and the authors' code
            do); "restval" keeps them as a fourth split.
        allow_missing: keep rows whose image is missing/corrupt with `image=None` instead of
            raising `MissingImagesError`.
        verify: "header" opens each image and checks its header (fast), "full" decodes it,
            "none" only checks that the file exists.
        workers: threads used to check the images (the check is I/O bound).
        report_path: where to write the report JSON (also written when the import fails).

    Returns:
        (DatasetDict, report) with report = {"total", "per_split", "missing", "corrupt",
        "few_captions", "allow_missing", ...}.
    """
    images_dir = Path(images_dir).resolve()
    if not images_dir.is_dir():
        raise NotADirectoryError(f"COCO images folder not found: {images_dir}")
    records = read_karpathy(karpathy_json)

    def locate(rec: dict[str, Any]) -> tuple[str | None, str | None]:
        for cand in image_candidates(images_dir, rec):
            if cand.is_file():
                return str(cand), check_image(cand, verify)
        return None, "missing"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        located = list(tqdm(pool.map(locate, records), total=len(records), desc="Checking COCO images",
                            unit="img", disable=not progress))

    missing = [int(r["cocoid"]) for r, (p, why) in zip(records, located) if why == "missing"]
    corrupt = {int(r["cocoid"]): why for r, (p, why) in zip(records, located) if why not in (None, "missing")}
    few = [int(r["cocoid"]) for r in records if len(r["sentences"]) < 5]
    if few:
        logger.warning("%d images have fewer than 5 captions (kept; ids in the report): %s", len(few), few[:20])

    rows: dict[str, dict[str, list]] = {}
    for rec, (path, why) in zip(records, located):
        split = rec["split"]
        target = "train" if (split == "restval" and restval == "train") else split
        cols = rows.setdefault(target, {k: [] for k in FEATURES})
        cols["cocoid"].append(int(rec["cocoid"]))
        cols["image"].append({"path": path, "bytes": None} if why is None else None)
        cols["captions"].append([s["raw"].strip() for s in rec["sentences"]])
        cols["split"].append(split)

    report = {
        "images_dir": str(images_dir), "karpathy_json": str(Path(karpathy_json).resolve()),
        "total": len(records), "per_split": {k: len(v["cocoid"]) for k, v in rows.items()},
        "restval": restval, "verify": verify, "allow_missing": allow_missing,
        "n_missing": len(missing), "n_corrupt": len(corrupt), "missing": missing,
        "corrupt": {str(k): v for k, v in corrupt.items()}, "few_captions": few,
    }
    if report_path is not None:
        write_json(Path(report_path), report)
    if (missing or corrupt) and not allow_missing:
        raise MissingImagesError(missing, corrupt, len(records), str(report_path) if report_path else None)
    if missing or corrupt:
        logger.warning("%d missing and %d corrupt images kept with image=None (ids in the report)",
                       len(missing), len(corrupt))

    order = [s for s in (*SPLITS, "restval") if s in rows]
    dsd = DatasetDict({s: datasets.Dataset.from_dict(rows[s], features=FEATURES, split=s) for s in order})
    return dsd, report


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------

def _content_hash(ds: datasets.Dataset) -> str:
    """Hash of a split's rows (ids, image paths, captions): a rerun resumes only on the same data."""
    h = hashlib.sha256()
    for batch in ds.cast_column("image", Image(decode=False)).iter(batch_size=4096):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _num_shards(ds: datasets.Dataset, embed: bool, max_shard_bytes: int) -> int:
    """Shards so that each parquet file stays under `max_shard_bytes` (image bytes counted from files)."""
    if not embed:
        return max(1, -(-len(ds) // 500_000))
    paths = ds.cast_column("image", Image(decode=False))["image"]
    total = sum(os.path.getsize(p["path"]) for p in paths if p is not None and p.get("path"))
    return max(1, min(len(ds), -(-total // max_shard_bytes)))


def _card(splits: Iterable[str], report: dict[str, Any] | None, embed: bool) -> str:
    data_files = "\n".join(f"  - split: {s}\n    path: data/{s}-*.parquet" for s in splits)
    counts = "" if report is None else "\n".join(
        f"| {s} | {n} |" for s, n in report["per_split"].items())
    return f"""---
configs:
- config_name: default
  data_files:
{data_files}
---
# COCO captions, Karpathy split

Built by `python -m datasets_scripts.coco` (NDLB project) from COCO images and Karpathy's
`dataset_coco.json`. Columns: `cocoid` (int64), `image` ({'embedded JPEG bytes' if embed else
'path to the local COCO file'}), `captions` (list of str), `split` (Karpathy label; "restval" rows
are in train unless imported with `--restval restval`).

| split | images |
|---|---|
{counts}

Missing/corrupt images: see `{REPORT_FILE}` (rows kept with `image=None` when imported with
`--allow-missing`). COCO images are under the Flickr terms of use / the licences listed in the
COCO annotations; COCO annotations are CC BY 4.0.
"""


def save_coco(dsd: DatasetDict, out_dir: str | os.PathLike, *, format: Literal["parquet", "arrow"] = "parquet",
              embed_images: bool = False, max_shard_size: int = 500 * 2**20, report: dict[str, Any] | None = None,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Write `dsd` to `out_dir` as parquet shards + README.md card (default) or with `save_to_disk`.

    Parquet shards are written one by one atomically (tmp file + rename); a rerun with the same
    options resumes and skips finished shards. A rerun with other options needs `overwrite=True`.
    `format="arrow"` always embeds the images (datasets 5's `save_to_disk` does).
    """
    out = Path(out_dir)
    options = {"format": format, "embed_images": embed_images, "splits": {s: len(d) for s, d in dsd.items()},
               "content_sha256": {s: _content_hash(d) for s, d in dsd.items()}}
    opt_file = out / OPTIONS_FILE
    if out.exists() and any(out.iterdir()):
        previous = json.loads(opt_file.read_text()) if opt_file.exists() else None
        if previous is None:  # never delete a folder this module did not write
            raise FileExistsError(f"{out} exists and was not written by datasets_scripts.coco; choose another --out")
        if overwrite:
            shutil.rmtree(out)
        elif previous != options:
            raise FileExistsError(f"{out} was written with other options or data; pass --overwrite "
                                  "(overwrite=True) to replace it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(opt_file, options)

    if format == "arrow":
        tmp = out / "_partial_arrow"
        shutil.rmtree(tmp, ignore_errors=True)
        dsd.save_to_disk(str(tmp))
        for child in tmp.iterdir():
            os.replace(child, out / child.name)
        tmp.rmdir()
    else:
        from datasets.arrow_writer import ParquetWriter

        (out / "data").mkdir(exist_ok=True)
        for split, ds in dsd.items():
            n = _num_shards(ds, embed_images, max_shard_size)
            for i in tqdm(range(n), desc=f"Writing {split} parquet shards", disable=not progress or n == 1):
                final = out / "data" / f"{split}-{i:05d}-of-{n:05d}.parquet"
                if final.exists():  # finished by an earlier run with the same options
                    continue
                shard = ds.shard(num_shards=n, index=i, contiguous=True)
                tmp = final.with_name(final.name + ".tmp")
                writer = ParquetWriter(features=FEATURES, path=str(tmp), embed_local_files=embed_images)
                try:
                    for table in shard.with_format("arrow").iter(batch_size=256):
                        writer.write_table(table)
                    writer.finalize()
                finally:
                    writer.close()
                os.replace(tmp, final)
        card = _card(dsd.keys(), report, embed_images)
        write_text(out / "README.md", card)
    if report is not None:
        write_json(out / REPORT_FILE, report)
    return out


def load_coco(path_or_id: str | os.PathLike, *, cache_dir: str | None = None, **kwargs: Any) -> DatasetDict:
    """Load a COCO DatasetDict written by this module (parquet folder or `save_to_disk` folder),
    any folder of `{split}-*.parquet` files, or a Hub dataset id."""
    path = Path(path_or_id)
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(path))
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path} holds neither a save_to_disk dataset (dataset_dict.json) "
                                    "nor parquet files; build it with `python -m datasets_scripts.coco`")
        data_files: dict[str, list[str]] = {}
        for f in files:
            split = f.name.split("-")[0].split(".")[0]
            data_files.setdefault(split, []).append(str(f))
        dsd = datasets.load_dataset("parquet", data_files=data_files, cache_dir=cache_dir, **kwargs)
        return DatasetDict({s: dsd[s] for s in (*SPLITS, "restval") if s in dsd} |
                           {s: d for s, d in dsd.items() if s not in (*SPLITS, "restval")})
    if path.exists() or str(path_or_id).count("/") != 1:
        raise not_found("COCO dataset folder", path, "build it with `python -m datasets_scripts.coco`")
    try:  # a Hub dataset id such as "user/coco_karpathy"
        return datasets.load_dataset(str(path_or_id), cache_dir=cache_dir, **kwargs)
    except Exception as e:
        raise FileNotFoundError(f"{path_or_id!r} is neither a local folder nor a loadable Hub dataset ({e})") from e


def concat_splits(dsd: DatasetDict, spec: str) -> datasets.Dataset:
    """Concatenate splits named in `spec` ("test+val"), in that order."""
    names = [s.strip() for s in spec.split("+") if s.strip()]
    unknown = [s for s in names if s not in dsd]
    if unknown:
        raise KeyError(f"split(s) {unknown} not in the dataset (has {list(dsd)})")
    parts = [dsd[s] for s in names]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_caption_source(source: str | os.PathLike) -> datasets.Dataset:
    """Every split of a caption dataset (e.g. the HolisticCap export: ``cocoid``, ``blendcap``,
    ``visualcap``, ``holisticcap``), a folder or Hub id, as one dataset: what
    :func:`trainers.join_caption_columns` joins onto the images by id."""
    return datasets.concatenate_datasets(list(load_coco(source).values()))


def fingerprint_ids(cocoids: Iterable[int]) -> str:
    """Short stable hash of a sequence of COCO ids (cache keys, page ids)."""
    h = hashlib.sha256()
    for c in cocoids:
        h.update(int(c).to_bytes(8, "little", signed=True))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m datasets_scripts.coco",
        description="Build the COCO Karpathy-split DatasetDict (cocoid, image, captions, split).")
    p.add_argument("--images", required=True, help="COCO images folder (train2014/ and val2014/ inside, or flat)")
    p.add_argument("--karpathy", required=True, help="Karpathy's dataset_coco.json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["parquet", "arrow"], default="parquet",
                   help="parquet shards + README card (default) or datasets' save_to_disk (always embeds images)")
    p.add_argument("--embed-images", action="store_true", help="store JPEG bytes instead of paths (parquet)")
    p.add_argument("--restval", choices=["train", "restval"], default="train",
                   help="put Karpathy 'restval' into train (default, as the paper) or keep it as its own split")
    p.add_argument("--allow-missing", action="store_true",
                   help="keep rows with missing/corrupt images with image=None instead of failing")
    p.add_argument("--verify", choices=["none", "header", "full"], default="header",
                   help="image check: header (default, fast), full decode, or existence only")
    p.add_argument("--workers", type=int, default=8, help="threads checking images (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    out = Path(args.out)
    try:
        dsd, report = build_coco(args.images, args.karpathy, restval=args.restval, allow_missing=args.allow_missing,
                                 verify=args.verify, workers=args.workers,
                                 report_path=out.with_name(out.name + "." + REPORT_FILE))
        save_coco(dsd, out, format=args.format, embed_images=args.embed_images, report=report,
                  overwrite=args.overwrite)
    except (MissingImagesError, FileExistsError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.with_name(out.name + "." + REPORT_FILE).unlink(missing_ok=True)
    print(f"wrote {out}: " + ", ".join(f"{s}={n}" for s, n in report["per_split"].items())
          + f"; missing={report['n_missing']}, corrupt={report['n_corrupt']} (details in {out / REPORT_FILE})")
    return 0


__all__ = ["FEATURES", "MissingImagesError", "build_coco", "check_image", "concat_splits", "fingerprint_ids",
           "load_caption_source",
           "image_candidates", "load_coco", "main", "read_karpathy", "save_coco"]

if __name__ == "__main__":
    sys.exit(main())
