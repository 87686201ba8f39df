"""Datasets and collators for MLE pre-training (NDLB Sec. 4.1-4.2).

MLE trains on every (image, caption) pair: a COCO image with 5 references gives 5 examples;
a single-caption column (e.g. ``blendcap`` or ``holisticcap``) gives one per image.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class CaptionPairs(Dataset):
    """Every (image, caption) pair of `dataset` as one example ``{"image", "caption"}``.

    Args:
        dataset: rows with `image_column` and `caption_column` (a string or a list of strings).
        caption_column: which captions to train on (``captions``, ``blendcap``, ``holisticcap``...).
    """

    def __init__(self, dataset, caption_column: str = "captions", image_column: str = "image"):
        if caption_column not in dataset.column_names:
            raise KeyError(f"caption column {caption_column!r} is not in the dataset (columns: {dataset.column_names})")
        self.dataset = dataset
        self.caption_column = caption_column
        self.image_column = image_column
        self.pairs: list[tuple[int, int]] = []
        for row, value in enumerate(dataset[caption_column]):
            captions = [value] if isinstance(value, str) else list(value or [])
            self.pairs += [(row, j) for j, c in enumerate(captions) if c and c.strip()]
        if not self.pairs:
            raise ValueError(f"no non-empty captions in column {caption_column!r}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, j = self.pairs[index]
        example = self.dataset[row]
        value = example[self.caption_column]
        return {"image": example[self.image_column], "caption": value if isinstance(value, str) else value[j]}


class CaptionCollator:
    """Examples ``{"image", "caption"}`` → ``pixel_values``, ``input_ids``, ``attention_mask`` and
    ``labels`` (padding masked with -100) through the `ClipCapProcessor`."""

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from metrics.clip_judge import load_image

        images = [load_image(e["image"]) for e in examples]
        return dict(self.processor(images=images, text=[e["caption"] for e in examples], max_length=self.max_length))


def join_caption_columns(dataset, source, id_column: str = "cocoid"):
    """Add the caption columns of another dataset (e.g. the HolisticCap export: ``blendcap``,
    ``visualcap``, ``holisticcap``) to `dataset`, matched by `id_column`.

    Args:
        dataset: the image dataset (COCO format) to extend.
        source: a ``datasets.Dataset`` holding `id_column` and caption columns (the scripts load
            a folder or Hub id with ``datasets_scripts.coco.load_caption_source``).

    Images without an entry get ``None`` (skipped by :class:`CaptionPairs`); how many is logged.
    """
    from transformers.utils import logging

    if id_column not in source.column_names:
        raise KeyError(f"the caption source has no {id_column!r} column (columns: {source.column_names})")
    skip = {id_column, "split", "image", *dataset.column_names}
    columns = [c for c in source.column_names if c not in skip]
    row_of = {key: row for row, key in enumerate(source[id_column])}
    rows = [row_of.get(key) for key in dataset[id_column]]
    missing = sum(r is None for r in rows)
    if missing:
        logging.get_logger(__name__).warning("%d of %d images have no entry in the caption source", missing, len(rows))
    for column in columns:
        values = source[column]
        dataset = dataset.add_column(column, [None if r is None else values[r] for r in rows])
    return dataset


__all__ = ["CaptionCollator", "CaptionPairs", "join_caption_columns"]
