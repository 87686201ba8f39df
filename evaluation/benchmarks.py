"""Benchmark data: TrueMatch bags, the evaluated image set (RD100 / CLIPScore / CIDEr-D), ImageCoDe.

Sources read here:

- **TrueMatch** (NDLB Sec. 3): our dataset (a folder or Hub id with configs ``bags_3``, ``bags_5``,
  ``bags_7``, one row per bag with ``cocoids``, ``images`` and the COCO ``captions``; written by
  ``python -m datasets_scripts.truematch``), or the authors' release format (``{3,5,7}.json``,
  lists of COCO ids, plus a folder of COCO images), read with
  :func:`datasets_scripts.truematch.read_authors_bags`.
- **References** for RD100, CLIPScore and CIDEr-D / BLEU: a COCO caption dataset (a folder or Hub
  id with ``cocoid``, ``image`` and ``captions`` columns per split, as ``datasets_scripts.coco``
  writes it), or a json ``{id: [captions]}`` with images from a folder.
- **ImageCoDe** (Krojer et al. 2022, NDLB Sec. 5): its released ``valid_data.json`` and
  ``image-sets`` folder (``metrics/self_retrieval``'s ``load_imagecode``).

Images are kept as sources (paths, or ``datasets`` ``{"bytes", "path"}`` dicts) and opened by the
project's one image loader when a judge or a captioner needs them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import not_found, read_json

from .captions import file_ids, norm_id

__all__ = ["BENCHMARKS", "BenchmarkRequestError", "ImageFolder", "TrueMatchData", "EvalSet", "ImageCoDeData",
           "BenchmarkData", "load_truematch", "load_references", "load_imagecode", "load_benchmarks",
           "image_bytes", "MAX_IDS_SHOWN"]

logger = logging.getLogger(__name__)

BENCHMARKS = ("truematch", "rd100", "clipscore", "nlg", "imagecode")
MAX_IDS_SHOWN = 20


class BenchmarkRequestError(ValueError):
    """A benchmark was asked for without the data it needs, or there is nothing to evaluate."""


class ImageFolder:
    """Finds an image by id in a folder tree: ``<id>.<ext>``, ``%012d.jpg`` and the COCO 2014 names
    (``COCO_val2014_%012d.jpg``, ``COCO_train2014_%012d.jpg``), in any sub-folder."""

    EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise not_found("images folder", self.root)
        self._by_stem: dict[str, Path] = {}
        for dirpath, _, files in sorted(os.walk(self.root)):
            for name in sorted(files):
                p = Path(dirpath) / name
                if p.suffix.lower() in self.EXTS:
                    self._by_stem.setdefault(p.stem, p)

    def find(self, image_id: Any) -> Path:
        s = norm_id(image_id)
        names = [s]
        if s.isdigit():
            i = int(s)
            names += [f"{i:012d}", f"COCO_val2014_{i:012d}", f"COCO_train2014_{i:012d}"]
        for name in names:
            if name in self._by_stem:
                return self._by_stem[name]
        looked = ", ".join(n + ".jpg" for n in names)
        raise FileNotFoundError(f"no image for id {s} in {self.root} (looked for {looked})")

    def ids(self) -> list[str]:
        """The id of every image in the folder (from its file name, as :func:`~.captions.file_ids`)."""
        return list(dict.fromkeys(file_ids(str(p))[0] for p in self._by_stem.values()))


@dataclass
class TrueMatchData:
    """TrueMatch bags: unique image ``ids`` with their ``images``, ``bags`` as lists of ids, the
    COCO ``references`` per id (empty for the authors' format) and the ``source`` read."""

    ids: list[str]
    images: list[Any]
    bags: list[list[str]]
    references: dict[str, list[str]]
    source: str
    sizes: list[int]


@dataclass
class EvalSet:
    """The image set of RD100 / CLIPScore / NLG: ``ids``, their ``images`` (None: references
    only), ``references`` (None: none) and a ``source`` description. ``key`` names the image list
    for the in-memory embedding cache (the TrueMatch images share TrueMatch's)."""

    ids: list[str]
    images: list[Any] | None
    references: dict[str, list[str]] | None
    source: str
    key: str = ""


@dataclass
class ImageCoDeData:
    """ImageCoDe samples (one per described image): ``ids`` (``"<set>/img<i>"``), ``image_sets``
    (image paths per sample), ``image_set_ids``, ``targets``, ``groups`` ("video" / "static")."""

    ids: list[str]
    image_sets: list[list[str]]
    image_set_ids: list[list[str]]
    targets: list[int]
    groups: list[str]


def load_truematch(source: str, sizes: list[int], images_dir: str | None = None) -> TrueMatchData:
    """TrueMatch bags from our dataset (folder or Hub id, configs ``bags_<s>``) or the authors'
    format (``<s>.json`` lists of COCO ids + an images folder, default ``<source>/images``).

    A bag that holds an image twice is a ``ValueError`` naming the file and the bag; a missing
    config, bag file or image a ``FileNotFoundError``.
    """
    src = Path(source)
    ours = not src.exists() or any((src / f"bags_{s}").is_dir() for s in sizes) or not any(
        (src / f"{s}.json").is_file() for s in sizes)
    images: dict[str, Any] = {}
    refs: dict[str, list[str]] = {}
    bags: list[list[str]] = []
    from trainers.bags import check_distinct_bag

    if ours:
        import datasets

        for s in sizes:
            try:
                ds = datasets.load_dataset(str(source), f"bags_{s}", split="test")
            except Exception as e:
                raise FileNotFoundError(f"could not load TrueMatch config bags_{s} from {source!r}: {e}") from e
            ds = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
            for n, row in enumerate(ds):
                ids = [norm_id(c) for c in row["cocoids"]]
                check_distinct_bag(ids, f"{source} [bags_{s}] row {n} (bag_id {row.get('bag_id', n)})")
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
                raise not_found(f"bags of size {s}", f, "see --bag-sizes")
            for n, bag in enumerate(read_authors_bags(f)):
                ids = [norm_id(c) for c in bag]
                bags.append(ids)
                for cid in ids:
                    if cid not in images:
                        images[cid] = str(folder.find(cid))
    ids = list(images)
    return TrueMatchData(ids, [images[i] for i in ids], bags, refs, str(source), list(sizes))


def load_references(references: str, split: str = "test", images_dir: str | None = None) -> EvalSet:
    """The evaluated set from references: a json ``{id: [captions]}`` file (images from
    ``images_dir``, if given) or a COCO caption dataset folder / Hub id (split ``split``; its own
    images, or those of ``images_dir``)."""
    ref_path = Path(references)
    if ref_path.is_file():
        data = read_json(ref_path, "references file")
        if not isinstance(data, dict):
            raise ValueError(f"{ref_path}: expected a json object {{id: [reference captions]}}")
        refs = {norm_id(k): ([v] if isinstance(v, str) else list(v)) for k, v in data.items()}
        ids = list(refs)
        images = None
        if images_dir:
            folder = ImageFolder(images_dir)
            images = [str(folder.find(i)) for i in ids]
        return EvalSet(ids, images, refs, f"{ref_path.name} ({len(ids)} images)", key=f"references:{references}")
    import datasets

    from datasets_scripts.coco import load_coco

    dsd = load_coco(references)
    if split not in dsd:
        raise KeyError(f"split {split!r} not in {references} (has {list(dsd)}); see --split")
    ds = dsd[split]
    ids = [norm_id(c) for c in ds["cocoid"]]
    refs = dict(zip(ids, (list(c) for c in ds["captions"])))
    if images_dir:
        folder = ImageFolder(images_dir)
        images = [str(folder.find(i)) for i in ids]
    else:
        images = ds.cast_column("image", datasets.Image(decode=False))["image"]
        absent = [i for i, im in zip(ids, images) if im is None]
        if absent:
            raise ValueError(f"{references} [{split}] has no image for ids {absent[:MAX_IDS_SHOWN]}; give --images")
    return EvalSet(ids, images, refs, f"{references} [{split}] ({len(ids)} images)",
                   key=f"references:{references}:{split}")


def load_imagecode(data_json: str, images_dir: str) -> ImageCoDeData:
    """ImageCoDe as released (``valid_data.json`` + ``image-sets/<set>/img<i>.jpg``)."""
    from metrics.self_retrieval.self_retrieval import load_imagecode as read

    ic = read(data_json, images_dir)
    return ImageCoDeData([norm_id(i) for i in ic["ids"]], ic["image_sets"], ic["image_set_ids"], ic["targets"],
                         ic["groups"])


@dataclass
class BenchmarkData:
    """Everything the benchmarks read, loaded once (see :func:`load_benchmarks`).

    Attributes:
        truematch: the bags, or None.
        references: the evaluated set given by references, or None.
        images_dir: a folder of images by id for RD100 / CLIPScore (with the captions' ids when no
            references are given), or None.
        imagecode: the ImageCoDe samples, or None.
        imagecode_data: whether ImageCoDe data was given (it may be unloaded when not asked for).
    """

    truematch: TrueMatchData | None = None
    references: EvalSet | None = None
    images_dir: str | None = None
    imagecode: ImageCoDeData | None = None
    imagecode_data: bool = False
    _folder: ImageFolder | None = field(default=None, repr=False)
    _embeddings: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    def folder(self) -> ImageFolder:
        if self._folder is None:
            self._folder = ImageFolder(self.images_dir)
        return self._folder

    def known_ids(self) -> set[str]:
        """The benchmarks' own image ids (captions keyed by file name are matched against them)."""
        known = set(self.truematch.ids) if self.truematch is not None else set()
        known |= set(self.imagecode.ids) if self.imagecode is not None else set()
        return known | (set(self.references.ids) if self.references is not None else set())

    def eval_set(self, caption_ids: list[str]) -> EvalSet | None:
        """The set of RD100 / CLIPScore / NLG, in this order: the references; the images folder
        with ``caption_ids``; the TrueMatch images (their COCO captions as references); None."""
        if self.references is not None:
            return self.references
        if self.images_dir:
            folder = self.folder()
            ids = list(caption_ids)
            source = f"{self.images_dir} ({len(ids)} captioned images)"
            return EvalSet(ids, [str(folder.find(i)) for i in ids], None, source,
                           key=f"images:{self.images_dir}:{hash(tuple(ids))}")
        if self.truematch is not None:
            tm = self.truematch
            return EvalSet(tm.ids, tm.images, tm.references or None, f"TrueMatch images ({len(tm.ids)} images)",
                           key="truematch")
        return None

    def images_to_caption(self) -> dict[str, Any]:
        """Every image some benchmark scores a caption of, by id (a captioner's work list): the
        TrueMatch images, the evaluated set (all images of the folder when it is the images folder
        alone) and the ImageCoDe targets' sets."""
        out: dict[str, Any] = {}
        if self.truematch is not None:
            out.update(zip(self.truematch.ids, self.truematch.images))
        if self.references is not None and self.references.images is not None:
            out.update((i, im) for i, im in zip(self.references.ids, self.references.images) if i not in out)
        elif self.references is None and self.images_dir:
            folder = self.folder()
            out.update((i, str(folder.find(i))) for i in folder.ids() if i not in out)
        if self.imagecode is not None:
            for sid, paths, set_ids in zip(self.imagecode.ids, self.imagecode.image_sets, self.imagecode.image_set_ids):
                out.setdefault(sid, paths[set_ids.index(sid)])
        return out


def load_benchmarks(*, truematch: str | None = None, truematch_images: str | None = None,
                    bag_sizes: list[int] = (3, 5, 7), references: str | None = None, split: str = "test",
                    images: str | None = None, imagecode_data: str | None = None,
                    imagecode_images: str | None = None, benchmarks: list[str] | None = None) -> BenchmarkData:
    """Load the data of the benchmarks asked for (``benchmarks``; None = every one whose data is
    given). Raises :class:`BenchmarkRequestError` when TrueMatch is asked for without bags."""
    wanted = set(benchmarks or [])
    unknown = wanted - set(BENCHMARKS)
    if unknown:
        raise BenchmarkRequestError(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    data = BenchmarkData(images_dir=images, imagecode_data=bool(imagecode_data))
    if truematch:
        data.truematch = load_truematch(truematch, list(bag_sizes), truematch_images)
    elif "truematch" in wanted:
        raise BenchmarkRequestError("--benchmark truematch needs --truematch (dataset folder, Hub id or authors' "
                                    "folder)")
    if imagecode_data and imagecode_images and (not wanted or "imagecode" in wanted):
        data.imagecode = load_imagecode(imagecode_data, imagecode_images)
    if references:
        data.references = load_references(references, split, images)
    return data


def image_bytes(source: Any) -> bytes:
    """The encoded bytes of an image source (a path, a ``{"bytes", "path"}`` dict, bytes, a PIL
    image (encoded as PNG) or an http(s) URL)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, dict):
        if source.get("bytes"):
            return bytes(source["bytes"])
        source = source.get("path")
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith(("http://", "https://")):
            from metrics.image_loading import fetch_url

            return fetch_url(text)
        try:
            return Path(text).read_bytes()
        except OSError as e:
            raise FileNotFoundError(f"could not read image {text}: {e}") from e
    if hasattr(source, "save"):  # a PIL image
        import io

        buf = io.BytesIO()
        source.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"not an image source: {type(source).__name__}")
