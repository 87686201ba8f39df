"""Dataset publishing: validate, complete and stage the TrueMatch and HolisticCap folders (NDLB Sec. 2-3).

The source folders are those written by ``python -m datasets_scripts.truematch build`` (or
``datasets_scripts.review_bags apply``) and ``python -m datasets_scripts.vcb export``. Before
anything is pushed, every config of the card's YAML ``configs:`` is loaded with
``datasets.load_dataset(folder, config)`` and checked (required columns and types; TrueMatch:
bags of the config's size, images embedded in the parquet files, no image in two bags of a
config, the authors' ``{s}.json`` in agreement; HolisticCap: one row per COCO id, the ``split``
column matching the split). The card is then completed where needed: licence metadata,
``dataset_info`` (features, splits, sizes) from the loaded data, size category, and the sections
"How it was built", "Licence" (COCO images: Flickr terms of use; COCO annotations: CC BY 4.0) and
"Citation". Machine paths are replaced by their last component in the card and JSON side files.

The staged folder holds only the card, the configs' parquet files and the known side files
(TrueMatch: ``{s}.json``, ``alpha_{s}.json``, ``mining_info.json``, ``review/``; HolisticCap:
``token_stats.*``, ``runs.json``), never caches. :mod:`publishing.hub` pushes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from huggingface_hub import DatasetCard

from common import size_category, staged_dir

from . import citations
from .hub import PublishError

logger = logging.getLogger(__name__)

# An absolute POSIX path inside text (not part of a URL or a relative path).
_ABS_PATH = re.compile(r"(?<![\w:/.~-])/(?:[\w.+-]+/)+[\w.+-]+")


@dataclass
class Report:
    """What validation found: rows per config and split, the loaded `DatasetInfo`s, warnings."""

    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    infos: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # kind-specific findings used by the card

    @property
    def total_rows(self) -> int:
        return max((sum(s.values()) for s in self.rows.values()), default=0)


# -- paths and cards ------------------------------------------------------------------------------


def scrub_paths(value: Any, found: set[str] | None = None) -> Any:
    """`value` (str, or nested dicts/lists) with absolute machine paths replaced by their last
    component; the replaced paths are added to `found`."""
    if isinstance(value, dict):
        return {k: scrub_paths(v, found) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v, found) for v in value]
    if isinstance(value, str):
        if os.path.isabs(value) and "\n" not in value:
            if found is not None:
                found.add(value)
            return Path(value.rstrip("/")).name or value

        def short(match: re.Match) -> str:
            if found is not None:
                found.add(match.group(0))
            return Path(match.group(0)).name

        return _ABS_PATH.sub(short, value)
    return value


def read_card(src: Path) -> DatasetCard:
    path = src / "README.md"
    if not path.is_file():
        raise PublishError(f"{path} is missing: {src} is not a dataset folder written by this project (its README.md "
                           "holds the YAML `configs:` that tell load_dataset where the data is).")
    card = DatasetCard(path.read_text(encoding="utf-8"))
    if not card.data.to_dict().get("configs"):
        raise PublishError(f"{path} has no YAML `configs:` block; rebuild the folder with the project's tools.")
    return card


def config_patterns(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(split, path pattern) pairs of one YAML config entry."""
    files = config.get("data_files")
    if isinstance(files, str):
        return [("train", files)]
    out = []
    for item in files or []:
        if isinstance(item, str):
            out.append(("train", item))
        else:
            paths = item.get("path")
            for p in [paths] if isinstance(paths, str) else paths or []:
                out.append((item.get("split", "train"), p))
    return out


def files_matching(src: Path, pattern: str) -> list[Path]:
    return sorted(p for p in src.glob(pattern) if p.is_file())


def has_section(body: str, *titles: str) -> bool:
    return any(re.search(rf"^#+\s*{t}\b", body, flags=re.IGNORECASE | re.MULTILINE) for t in titles)


# -- dataset kinds --------------------------------------------------------------------------------


LICENCE_IMAGES = """- **Images** (TrueMatch only embeds them): MS COCO images are Flickr photos. They are
  not owned by the COCO Consortium or by us; their use is subject to the
  [Flickr Terms of Use](https://www.flickr.com/help/terms) and to the Creative Commons licence
  listed for each image in the COCO annotations (`licenses` / `license` fields). Check those
  before any use beyond research.
- **Annotations**: the COCO captions are © COCO Consortium, licensed under
  [CC BY 4.0](https://creativecommons.org/licenses/by/4.0/); attribute them when you use
  this dataset."""


@dataclass
class Kind:
    name: str
    pretty_name: str
    required: dict[str, str]  # column -> expected feature type (repr prefix)
    side_files: tuple[str, ...]  # glob patterns of files published beside the data
    validate: Callable[[Path, Any, str, Report], None]
    how_built: Callable[[Report], str]
    licence: Callable[[Report], str]
    tags: tuple[str, ...]


def _feature_type(feature: Any) -> str:
    return type(feature).__name__ + ("[" + _feature_type(feature.feature) + "]" if hasattr(feature, "feature") else "")


def check_columns(kind: Kind, name: str, split: str, dataset) -> None:
    missing = [c for c in kind.required if c not in dataset.features]
    if missing:
        raise PublishError(f"config {name!r} split {split!r}: required columns {missing} are missing (has "
                           f"{list(dataset.features)}).")
    wrong = {c: _feature_type(dataset.features[c]) for c, t in kind.required.items()
             if _feature_type(dataset.features[c]) != t}
    if wrong:
        raise PublishError(f"config {name!r} split {split!r}: wrong column types {wrong}; expected "
                           f"{ {c: kind.required[c] for c in wrong} }.")


def validate_truematch(src: Path, dataset, name: str, report: Report) -> None:
    """Bags of the config's size, embedded images, each image in at most one bag, authors' json agrees."""
    import pyarrow.compute as pc

    m = re.fullmatch(r"bags_(\d+)", name)
    if not m:
        raise PublishError(f"TrueMatch config {name!r}: expected names bags_<size> (bags_3, bags_5, bags_7).")
    size = int(m.group(1))
    if set(dataset) != {"test"}:
        raise PublishError(f"TrueMatch config {name!r} has splits {sorted(dataset)}; expected the single split 'test'.")
    table = dataset["test"].data.table
    for column in ("cocoids", "images", "captions"):
        lengths = pc.list_value_length(table[column])
        if pc.min(lengths).as_py() != size or pc.max(lengths).as_py() != size:
            raise PublishError(f"TrueMatch config {name!r}: column {column!r} has lists of "
                               f"{pc.min(lengths).as_py()}..{pc.max(lengths).as_py()} items; every bag must hold "
                               f"{size}.")
    images = pc.list_flatten(table["images"])
    no_bytes = sum(chunk.field("bytes").null_count for chunk in images.chunks)
    if no_bytes:
        raise PublishError(f"TrueMatch config {name!r}: {no_bytes} images are stored as local paths, not embedded "
                           "bytes, and would not exist on the Hub; rebuild without --no-embed-images.")
    ids = pc.list_flatten(table["cocoids"]).to_pylist()
    if len(ids) != len(set(ids)):
        twice = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise PublishError(f"TrueMatch config {name!r}: images {twice[:10]} are in more than one bag; "
                           "curated bags (Alg. 2) are disjoint.")
    bag_ids = table["bag_id"].to_pylist()
    if len(bag_ids) != len(set(bag_ids)):
        raise PublishError(f"TrueMatch config {name!r}: bag_id values are not unique.")
    info_path = src / "mining_info.json"
    if info_path.is_file():
        review = (json.loads(info_path.read_text(encoding="utf-8")).get("review") or {}).get(str(size))
        if not review:
            report.warnings.append(f"{name}: the bags were not reviewed by hand (the paper keeps only bags that need "
                                   "fine-grained discrimination; see python -m datasets_scripts.review_bags)")
    authors = src / f"{size}.json"
    if authors.is_file():
        if json.loads(authors.read_text(encoding="utf-8")) != table["cocoids"].to_pylist():
            raise PublishError(f"{authors} (authors' format) does not list the bags of config {name!r} in the same "
                               "order; rebuild the folder so that both agree.")
    report.facts.setdefault("sizes", []).append(size)


def validate_holisticcap(src: Path, dataset, name: str, report: Report) -> None:
    """One row per COCO id, `split` equal to the split name, captions present; generator models noted."""
    seen: dict[int, str] = {}
    models: dict[str, set[str]] = {}
    for split, ds in dataset.items():
        table = ds.data.table
        splits = set(table["split"].to_pylist())
        if splits - {split}:
            raise PublishError(f"HolisticCap config {name!r} split {split!r}: its `split` column holds "
                               f"{sorted(splits)}.")
        for cid in table["cocoid"].to_pylist():
            if cid in seen:
                raise PublishError(f"HolisticCap config {name!r}: cocoid {cid} appears twice ({seen[cid]}, {split}).")
            seen[cid] = split
        empty = sum(1 for t in table["holisticcap"].to_pylist() if not t)
        if empty == len(ds):
            raise PublishError(f"HolisticCap config {name!r} split {split!r}: no row has a holisticcap caption.")
        if empty:
            report.warnings.append(f"{split}: {empty} of {len(ds)} rows have no holisticcap caption (exported with "
                                   "--allow-partial)")
        for stage in ("blendcap", "visualcap", "holisticcap"):
            column = f"{stage}_model"
            if column in table.column_names:
                models.setdefault(stage, set()).update(m for m in table[column].to_pylist() if m)
    local = sorted({m for ms in models.values() for m in ms if os.path.isabs(m)})
    if local:
        report.warnings.append(f"the <stage>_model columns hold local paths {local[:3]}; they are published as is "
                               "(the card shows their last component)")
    report.facts["models"] = {k: sorted(scrub_paths(sorted(v))) for k, v in models.items()}


def truematch_how_built(report: Report) -> str:
    sizes = ", ".join(str(s) for s in sorted(report.facts.get("sizes", [])))
    return f"""Built with the NDLB project's `python -m datasets_scripts.truematch build` (paper Sec. 3.1,
App. B.1) over COCO images of the Karpathy val/test splits: multimodal CLIP embeddings (image
embedding concatenated with the mean embedding of the image's captions), each image's nearest
neighbours as a candidate bag (Alg. 1), bags sorted by intra-bag similarity and kept only if they
share no image with a kept bag (Alg. 2), then (optionally) manual review with
`python -m datasets_scripts.review_bags`. Bag sizes: {sizes}."""


def holisticcap_how_built(report: Report) -> str:
    models = report.facts.get("models", {})
    used = "; ".join(f"{stage}: {', '.join(m)}" for stage, m in models.items() if m) or "see the provenance table"
    return f"""Visual Caption Boost (paper Sec. 2, App. A), run with `python -m datasets_scripts.vcb run` then
`export`: an instruction LLM blends the human COCO captions of an image into one caption
(**BlendCap**), a vision-language model describes the image (**VisualCap**), and the LLM adds
VisualCap's visual details to BlendCap, preferring BlendCap where they disagree (**HolisticCap**).
Answers are cleaned (preambles, quotes, role tags, rambling) and flagged, not dropped. Models
used: {used}."""


def truematch_licence(report: Report) -> str:
    return LICENCE_IMAGES + """
- **Bag lists, similarity scores and this card**: CC BY 4.0 (`license: cc-by-4.0`)."""


def holisticcap_licence(report: Report) -> str:
    models = sorted({m for ms in report.facts.get("models", {}).values() for m in ms})
    terms = f" ({', '.join(models)})" if models else ""
    return LICENCE_IMAGES.replace("(TrueMatch only embeds them)", "(not included here; join on `cocoid`)") + f"""
- **Generated captions** (BlendCap, VisualCap, HolisticCap): derived from the COCO annotations
  and released under CC BY 4.0 (`license: cc-by-4.0`); they were written by models{terms}
  whose own licences / terms of use may restrict how their outputs are used (e.g.
  Mistral-7B-Instruct: Apache 2.0; check the VLM's licence)."""


KINDS = {
    "truematch": Kind(
        "truematch", "TrueMatch",
        {"bag_id": "Value", "cocoids": "List[Value]", "images": "List[Image]", "captions": "List[List[Value]]",
         "alpha": "Value"},
        ("[0-9]*.json", "alpha_*.json", "mining_info.json", "review/*.json"),
        validate_truematch, truematch_how_built, truematch_licence,
        ("image-captioning", "self-retrieval", "fine-grained", "coco", "benchmark")),
    "holisticcap": Kind(
        "holisticcap", "HolisticCap",
        {"cocoid": "Value", "split": "Value", "coco_captions": "List[Value]", "blendcap": "Value",
         "visualcap": "Value", "holisticcap": "Value"},
        ("token_stats.json", "token_stats.md", "runs.json"),
        validate_holisticcap, holisticcap_how_built, holisticcap_licence,
        ("image-captioning", "coco", "synthetic-captions", "visual-caption-boost")),
}


# -- validation, card, staging --------------------------------------------------------------------


def validate(kind: Kind, src: Path, card: DatasetCard, cache_dir: str | None = None) -> Report:
    """Load every config with `load_dataset(src, config)` and run the kind's checks."""
    import datasets

    report = Report()
    configs = card.data.to_dict()["configs"]
    with tempfile.TemporaryDirectory(prefix="publish-cache-") as tmp:
        for config in configs:
            name = config.get("config_name", "default")
            for split, pattern in config_patterns(config):
                if not files_matching(src, pattern):
                    raise PublishError(f"config {name!r} split {split!r}: no file in {src} matches {pattern!r}.")
            try:
                dataset = datasets.load_dataset(str(src), name, cache_dir=cache_dir or tmp)
            except Exception as err:  # datasets raises many types (ValueError, DatasetGenerationError, ArrowInvalid...)
                raise PublishError(f"load_dataset({src}, {name!r}) failed: {type(err).__name__}: {err}") from err
            report.rows[name] = {}
            for split, ds in dataset.items():
                check_columns(kind, name, split, ds)
                if len(ds) == 0:
                    raise PublishError(f"config {name!r} split {split!r} is empty.")
                report.rows[name][split] = len(ds)
            report.infos[name] = next(iter(dataset.values())).info.copy()
            kind.validate(src, dataset, name, report)
            del dataset
    return report


def add_missing_configs(kind: Kind, src: Path, meta: dict[str, Any]) -> list[str]:
    """TrueMatch: a bags_<s>/ folder with parquet files but no config entry gets one."""
    if kind.name != "truematch":
        return []
    names = {c.get("config_name") for c in meta["configs"]}
    added = []
    for folder in sorted(src.glob("bags_*")):
        if folder.is_dir() and folder.name not in names and list(folder.glob("*.parquet")):
            meta["configs"].append({"config_name": folder.name,
                                    "data_files": [{"split": "test", "path": f"{folder.name}/*.parquet"}]})
            added.append(folder.name)
    return added


def complete_card(kind: Kind, card: DatasetCard, report: Report) -> tuple[str, list[str]]:
    """The card text to publish and the list of changes made to the source card."""
    from datasets.info import DatasetInfosDict

    changes: list[str] = []
    data = card.data
    for key, value in (("license", "cc-by-4.0"), ("pretty_name", kind.pretty_name), ("language", ["en"]),
                       ("task_categories", ["image-to-text"]), ("size_categories", [size_category(report.total_rows)])):
        if not data.get(key):
            data[key] = value
            changes.append(f"added `{key}`")
    tags = list(dict.fromkeys([*(data.get("tags") or []), *kind.tags]))
    if tags != (data.get("tags") or []):
        data["tags"] = tags
        changes.append("added tags")
    if not data.get("dataset_info"):
        changes.append("added `dataset_info` (features, splits, sizes)")
    DatasetInfosDict(report.infos).to_dataset_card_data(data)  # features and sizes of the data as loaded

    body = card.text.rstrip() + "\n"
    extra: dict[str, str] = {}
    if not has_section(body, "How it was built", "Dataset creation", "Construction"):
        extra["how it was built"] = "## How it was built\n\n" + kind.how_built(report)
    if not has_section(body, "Licen[cs]e", "Licensing"):
        extra["licence"] = "## Licence\n\n" + kind.licence(report)
    elif not re.search(r"Flickr", body) or not re.search(r"CC BY 4\.0|cc-by-4\.0", body, flags=re.IGNORECASE):
        extra["licence notes"] = "## Licence notes\n\n" + kind.licence(report)
    if "2409.03025" not in body:
        extra["NDLB citation"] = f"## Citation\n\n```bibtex\n{citations.NDLB}\n```"
    if "lin2014coco" not in body and "Common Objects in Context" not in body:
        extra["COCO citation"] = f"COCO (Lin et al., 2014):\n\n```bibtex\n{citations.COCO}\n```"
    if extra:
        changes.append("added to the card: " + ", ".join(extra))
        body += "\n" + "\n\n".join(extra.values()) + "\n"
    found: set[str] = set()
    body = scrub_paths(body, found)
    if found:
        changes.append(f"replaced machine paths by their last component: {sorted(found)}")
    return f"---\n{data.to_yaml()}\n---\n\n{body.lstrip()}", changes


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage_dataset(kind_name: str, src: str | os.PathLike, out: str | os.PathLike, *, cache_dir: str | None = None,
                  overwrite: bool = False) -> Report:
    """Validate `src` and write the folder to publish into `out` (atomically); returns the report."""
    kind = KINDS[kind_name]
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise PublishError(f"--src {src}: no such folder.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PublishError(f"{out} exists and is not empty; pass --overwrite or choose another folder.")
    if out.resolve() == src.resolve():
        raise PublishError("the staging folder must differ from --src.")
    card = read_card(src)
    meta = card.data.to_dict()
    added = add_missing_configs(kind, src, meta)
    if added:
        card.data["configs"] = meta["configs"]
    report = validate(kind, src, card, cache_dir)
    text, changes = complete_card(kind, card, report)
    if added:
        changes.insert(0, f"added configs {added} for data folders the card did not list")

    files = {p for config in card.data.to_dict()["configs"] for _, pattern in config_patterns(config)
             for p in files_matching(src, pattern)}
    side = {p for pattern in kind.side_files for p in files_matching(src, pattern)}
    with staged_dir(out) as tmp:
        for path in sorted(files):
            _link_or_copy(path, tmp / path.relative_to(src))
        for path in sorted(side - files):
            dst = tmp / path.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".json":  # side files may carry the builder's paths (dataset, judge, model)
                found: set[str] = set()
                dst.write_text(json.dumps(scrub_paths(json.loads(path.read_text(encoding="utf-8")), found),
                                          indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                if found:
                    changes.append(f"{path.name}: replaced machine paths {sorted(found)}")
            else:
                dst.write_text(scrub_paths(path.read_text(encoding="utf-8")), encoding="utf-8")
        (tmp / "README.md").write_text(text, encoding="utf-8")
    left = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and p not in files | side
                  and p.name != "README.md")
    report.facts["changes"] = changes
    report.facts["left_out"] = left
    for change in changes:
        logger.info("card/side files: %s", change)
    if left:
        shown = ", ".join(left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10 else "")
        logger.info("not published (caches and unknown files): %s", shown)
    for warning in report.warnings:
        logger.warning("warning: %s", warning)
    return report


__all__ = ["KINDS", "Kind", "Report", "complete_card", "scrub_paths", "stage_dataset", "validate"]
