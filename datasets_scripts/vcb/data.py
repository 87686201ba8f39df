"""Input side of Visual Caption Boost: one split of the COCO dataset (docs/formats.md: COCO dataset).

The dataset is a ``DatasetDict`` saved with ``save_to_disk`` or as parquet (a folder that
``load_dataset`` reads, or a single ``.parquet`` file), with columns ``cocoid`` (int),
``image`` (``datasets.Image()``), ``captions`` (list of str) and ``split``. Images are read
as their stored file bytes (no decode/re-encode) for HTTP backends and decoded with PIL for
local models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from common import not_found

__all__ = ["CocoSplit", "load_dataset_dict", "load_split", "select_ids", "parse_ids", "parse_shard"]


_SPLIT_RE = re.compile(r"^(train|val|validation|test|restval|dev)(?=[-_.]|$)")


def _parquet_data_files(folder: Path) -> dict[str, list[str]]:
    """Split -> absolute parquet files of a dataset folder: from the README's YAML ``configs``
    (default config) if there is one, else from file/folder names (``train-0000.parquet``,
    ``val/x.parquet``; anything else is "train")."""
    files: dict[str, list[str]] = {}
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        meta = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") and text.count("---") >= 2 else None
        configs = (meta or {}).get("configs") or []
        cfg = next((c for c in configs if c.get("default") or c.get("config_name") == "default"),
                   configs[0] if configs else None)
        entries = (cfg or {}).get("data_files") or []
        if isinstance(entries, (str, dict)):
            entries = [entries] if isinstance(entries, str) else [{"split": k, "path": v} for k, v in entries.items()]
        for e in entries:
            split, patterns = ("train", e) if isinstance(e, str) else (e.get("split", "train"), e["path"])
            for pat in [patterns] if isinstance(patterns, str) else patterns:
                files.setdefault(split, []).extend(sorted(str(f) for f in folder.glob(pat)))
    if not files:
        for f in sorted(folder.rglob("*.parquet")):
            rel = f.relative_to(folder).parts
            m = next((m for m in (_SPLIT_RE.match(part) for part in reversed(rel)) if m), None)
            files.setdefault(m.group(1) if m else "train", []).append(str(f))
    return {k: v for k, v in files.items() if v}


def load_dataset_dict(path: str | Path):
    """Load the whole COCO dataset (``DatasetDict``) from a ``save_to_disk`` folder, a parquet
    folder or a parquet file (a single-file dataset is split by its ``split`` column).

    Parquet is read through ``load_dataset("parquet", data_files=<absolute paths>)``: calling
    ``load_dataset(folder)`` on a folder with a README ``configs:`` block caches by folder *name*
    in datasets 5.2, so two different folders called e.g. ``coco`` would share (stale) data.
    """
    import datasets

    p = Path(path)
    if not p.exists():
        raise not_found("COCO dataset", p, "build it with datasets_scripts.coco (format: docs/formats.md)")
    if p.is_dir() and (p / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(p))
    if p.is_dir() and (p / "state.json").is_file():
        ds = datasets.load_from_disk(str(p))
    elif p.is_file():
        ds = datasets.load_dataset("parquet", data_files=str(p.resolve()), split="train")
    else:
        data_files = _parquet_data_files(p.resolve())
        if not data_files:
            raise FileNotFoundError(f"{p} holds no dataset: expected a save_to_disk folder or parquet files")
        dd = datasets.load_dataset("parquet", data_files=data_files)
        if set(dd) != {"train"} or "split" not in dd["train"].column_names:
            return dd
        ds = dd["train"]
    if "split" not in ds.column_names:
        return datasets.DatasetDict({"train": ds})
    names = sorted(set(ds["split"]))
    return datasets.DatasetDict({n: ds.filter(lambda s, n=n: s == n, input_columns="split") for n in names})


@dataclass
class CocoSplit:
    """One split of the COCO dataset with fast access by COCO id.

    Attributes:
        ds: the split (``image`` not decoded: ``{"bytes", "path"}`` dicts).
        split: its name.
        ids: COCO ids in dataset order.
        source: where it was loaded from (for messages and manifests).
    """

    ds: object
    split: str
    ids: list[int]
    source: str

    def __post_init__(self) -> None:
        self._row = {cid: i for i, cid in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            raise ValueError(f"{self.source} split {self.split!r} has duplicate cocoid values")

    def __contains__(self, cocoid: int) -> bool:
        return cocoid in self._row

    def rows(self, ids: list[int]) -> list[int]:
        return [self._row[i] for i in ids]

    def captions(self, ids: list[int]) -> list[list[str]]:
        """Human captions of each id."""
        return self.ds.select_columns(["captions"])[self.rows(ids)]["captions"]

    def image_bytes(self, ids: list[int]) -> list[bytes | None]:
        """The stored encoded image (PNG/JPEG ...) of each id; None where the dataset has no image
        (COCO imports with missing files keep such rows with ``image=None``)."""
        if "image" not in self.ds.column_names:
            raise ValueError(f"{self.source} split {self.split!r} has no `image` column (needed by visualcap)")
        out: list[bytes | None] = []
        for cid, img in zip(ids, self.ds.select_columns(["image"])[self.rows(ids)]["image"]):
            if img is None or not (img.get("bytes") or img.get("path")):
                out.append(None)
                continue
            if img.get("bytes"):
                out.append(img["bytes"])
                continue
            path = Path(img.get("path") or "")
            if not path.is_absolute() and not path.is_file():
                path = Path(self.source) / path
            try:
                out.append(path.read_bytes())
            except OSError as e:
                raise FileNotFoundError(f"{self.source}: image of cocoid {cid} not readable at {path}: {e}") from e
        return out

    def images(self, ids: list[int]):
        """Decoded RGB PIL images of each id (the project's one loader: EXIF-orientated, transparency on white)."""
        from metrics.image_loading import open_image

        return [None if b is None else open_image(b) for b in self.image_bytes(ids)]


def load_split(path: str | Path, split: str = "train") -> CocoSplit:
    """Load one split of the COCO dataset; errors name the file, the split and the columns."""
    import datasets

    dd = load_dataset_dict(path)
    if split not in dd:
        raise KeyError(f"{path} has no split {split!r}; available: {sorted(dd)}")
    ds = dd[split]
    missing = {"cocoid", "captions"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{path} split {split!r} lacks columns {sorted(missing)} (a COCO dataset, docs/formats.md: "
                         f"cocoid, image, captions, split); it has {ds.column_names}")
    if "image" in ds.column_names:
        ds = ds.cast_column("image", datasets.Image(decode=False))
    return CocoSplit(ds=ds, split=split, ids=[int(i) for i in ds["cocoid"]], source=str(path))


def parse_ids(spec: str | None) -> list[int] | None:
    """``--ids``: comma-separated ids, or ``@FILE`` / a file path with one id per line."""
    if not spec:
        return None
    text = spec
    path = Path(spec[1:] if spec.startswith("@") else spec)
    if spec.startswith("@") or path.is_file():
        text = path.read_text(encoding="utf-8").replace("\n", ",")
    try:
        return [int(t) for t in text.replace(" ", ",").split(",") if t.strip()]
    except ValueError as e:
        raise ValueError(f"--ids must be integers separated by commas (or @file with one per line): {e}") from e


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``--shard i/n`` -> (i, n) with 0 <= i < n."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError as e:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from e
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def select_ids(all_ids: list[int], ids: list[int] | None = None, shard: tuple[int, int] = (0, 1),
               limit: int | None = None) -> list[int]:
    """The ids a run covers: ``ids`` (in their order, else dataset order) that exist, of this
    machine's shard (``cocoid % n == i``), the first ``limit`` of them. Unknown ids raise."""
    if ids is not None:
        known = set(all_ids)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise KeyError(f"--ids not in the split: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        chosen = list(dict.fromkeys(ids))
    else:
        chosen = list(all_ids)
    i, n = shard
    chosen = [c for c in chosen if c % n == i]
    return chosen if limit is None else chosen[:limit]
