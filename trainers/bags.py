"""Batches made of whole hard-negative bags, and the bag-size curriculum (NDLB Sec. 4.6, App. B.2-B.3).

- :class:`BagBatchSampler` yields each batch as whole training bags (from
  ``datasets_scripts.truematch_mining.training_bags``): every image of a bag lands in the same batch, so
  the self-retrieval reward sees its hard negatives. Bag size ``0`` (or ``None``) means random
  in-batch distractors (DiscriTune). A batch never straddles processes or gradient-accumulation
  steps, because accelerate hands out whole batches.
- :class:`BagCurriculumCallback` (BagCurri) moves the sampler to the bag size of each epoch.
- :class:`BagCollator` turns a batch into ``pixel_values`` plus the columns reward functions need
  (``cocoid``, ``image``, ``captions``, ``bag_id``, ...).

Sampling order::

    bags of the epoch's size s, shuffled with seed + epoch
    batch 0: [bag 0 images][bag 1 images]...[bag m-1 images]      m = max(1, images_per_batch // s)
    batch 1: [bag m ...] ...
    every batch index is a (row, bag_id) pair; bag_id counts bags within the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from transformers import TrainerCallback

RANDOM = 0  # bag size meaning "random in-batch distractors"


def _bag_size(item: Any, schedule: Any) -> int:
    item = str(item).strip().lower()
    if item in ("", "rand", "random", "none", "0"):
        return RANDOM
    try:
        size = int(item)
    except ValueError:
        raise ValueError(f"bag size {item!r} in the schedule {schedule!r} is not a number; use 0/rand or >= 2") from None
    if size < 0 or size == 1:
        raise ValueError(f"bag size {size} in the schedule {schedule!r}: use 0 (random) or >= 2")
    return size


def parse_bag_schedule(schedule: str | Sequence[int | str] | Mapping[int, int | str] | None) -> list[int]:
    """Per-epoch bag sizes (index 0 = the first epoch); ``0`` = random in-batch distractors.

    Accepted forms:

    - one size per epoch: ``"3,5,7"`` or ``[3, 5, 7]``; the last size repeats for later epochs;
    - the authors' curriculum (``configs/sr.yml``, ``neg_mining.curricullum``): ``{last epoch: size}``
      as a mapping or ``"3:2,8:3,10:5"`` (epochs 1-3 bags of 2, 4-8 of 3, 9-10 of 5, then 5);
    - ``"rand"``/``0``, empty or None: random distractors throughout.
    """
    if schedule is None:
        return [RANDOM]
    if isinstance(schedule, str) and ":" in schedule:
        pairs = {}
        for part in schedule.split(","):
            epoch, _, size = part.partition(":")
            try:
                pairs[int(epoch)] = size
            except ValueError:
                raise ValueError(f"{part!r} in the bag schedule {schedule!r}: expected last_epoch:size") from None
        schedule = pairs
    if isinstance(schedule, Mapping):
        sizes, previous = [], 0
        for last_epoch in sorted(int(e) for e in schedule):
            if last_epoch <= previous:
                raise ValueError(f"last epochs in the bag schedule {schedule!r} must be positive and increasing")
            size = _bag_size(schedule.get(last_epoch, schedule.get(str(last_epoch))), schedule)
            sizes += [size] * (last_epoch - previous)
            previous = last_epoch
        return sizes or [RANDOM]
    items = schedule.split(",") if isinstance(schedule, str) else list(schedule)
    return [_bag_size(item, schedule) for item in items] or [RANDOM]


class BagBatchSampler:
    """Batch sampler over whole bags with a per-epoch bag size.

    Args:
        num_rows: number of images in the training set (rows of the dataset).
        images_per_batch: target images per batch (per process); a batch holds
            ``max(1, images_per_batch // s)`` bags of size s, or this many random images.
        bags: ``{bag size: [[row, ...], ...]}`` training bags per size (disjoint within a size).
        schedule: bag size per epoch (see :func:`parse_bag_schedule`).
        seed: shuffling seed (combined with the epoch).

    Every epoch has the same number of batches, the most that every size of the schedule can
    fill; bags left over in an epoch are skipped for that epoch (reshuffled in the next).
    """

    def __init__(self, num_rows: int, images_per_batch: int, bags: Mapping[int, Sequence[Sequence[int]]] | None,
                 schedule: Sequence[int], seed: int = 0):
        self.num_rows = num_rows
        self.images_per_batch = images_per_batch
        self.bags = {int(s): [list(map(int, b)) for b in v] for s, v in (bags or {}).items()}
        self.schedule = list(schedule)
        self.seed = seed
        self.drop_last = True  # accelerate: never pad a process's batches with other batches' images
        self.batch_size = None  # batches may differ in size between epochs
        self.epoch = 0
        for size in set(self.schedule) - {RANDOM}:
            if not self.bags.get(size):
                raise ValueError(f"the bag schedule {list(self.schedule)} uses bags of {size}, but no training bags of "
                                 f"that size were given (have: {sorted(self.bags) or 'none'}); pass training bags of "
                                 "every size (train_sr.py --bags FILE ...), or bag_schedule='rand' for random "
                                 "in-batch distractors")
            wrong = [b for b in self.bags[size] if len(b) != size]
            if wrong:
                raise ValueError(f"{len(wrong)} bags listed under size {size} have another size, e.g. {wrong[0]}")
        self._num_batches = min(self._capacity(size) for size in self.schedule)
        if self._num_batches == 0:
            raise ValueError(f"not enough images/bags for one batch of {images_per_batch} images")

    def bags_per_batch(self, size: int) -> int:
        return max(1, self.images_per_batch // size)

    def _capacity(self, size: int) -> int:
        if size == RANDOM:
            return self.num_rows // self.images_per_batch
        return len(self.bags[size]) // self.bags_per_batch(size)

    @property
    def bag_size(self) -> int:
        """Bag size of the current epoch (0 = random distractors)."""
        return self.schedule[min(self.epoch, len(self.schedule) - 1)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        size = self.bag_size
        if size == RANDOM:
            order = rng.permutation(self.num_rows)
            for b in range(self._num_batches):
                rows = order[b * self.images_per_batch : (b + 1) * self.images_per_batch]
                yield [(int(r), 0) for r in rows]  # one "bag": every image is a candidate
            return
        per_batch = self.bags_per_batch(size)
        order = rng.permutation(len(self.bags[size]))
        for b in range(self._num_batches):
            chosen = order[b * per_batch : (b + 1) * per_batch]
            yield [(row, bag_id) for bag_id, k in enumerate(chosen) for row in self.bags[size][k]]


class BagCurriculumCallback(TrainerCallback):
    """BagCurri (App. B.3): at each epoch start, move the sampler to that epoch's bag size.

    The bag size depends only on the epoch, so a resumed run (whose ``state.epoch`` is restored
    from the checkpoint) continues with the same size and the same shuffle.
    """

    def __init__(self, sampler: BagBatchSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(state.epoch + 1e-6))
        return control


class BagView(Dataset):
    """A dataset indexed by ``(row, bag_id)`` pairs: the row's example plus its ``bag_id``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        row, bag_id = key
        example = dict(self.dataset[int(row)])
        example["bag_id"] = int(bag_id)
        return example


class BagCollator:
    """Batch of examples → ``pixel_values`` (B, 3, H, W) for the captioner, and every column as a
    list (``cocoid``, ``image``, ``captions``, ``bag_id``...) for the reward functions."""

    def __init__(self, processor, image_column: str = "image"):
        self.processor = processor
        self.image_column = image_column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from metrics.clip_judge import load_image

        images = [load_image(e[self.image_column]) for e in examples]
        batch: dict[str, Any] = {k: [e[k] for e in examples] for k in examples[0]}
        batch[self.image_column] = images
        batch["pixel_values"] = self.processor(images=images)["pixel_values"]
        return batch


def check_distinct_bag(bag: Sequence[Any], where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` (e.g. ``"3.json: bag 4"``) when ``bag`` holds an image
    twice: R@1 within such a bag, or a bag of "hard negatives" that contains its own positive, is
    meaningless. The one check used by the training bags, the authors' bag files and evaluation."""
    bag = list(bag)
    repeated = sorted({str(c) for c in bag if bag.count(c) > 1})
    if repeated:
        raise ValueError(f"{where} holds image id(s) {', '.join(repeated)} more than once ({bag}); every image "
                         "of a bag must be distinct: fix or drop that bag")


def bags_from_cocoids(bag_cocoids: Sequence[Sequence[Any]], cocoids: Sequence[Any],
                      where: str = "the training set") -> list[list[int]]:
    """Map bags of COCO ids (the training-bag JSON format) to dataset rows.

    ``where`` names the dataset in errors (e.g. ``"the eval split 'val'"``). Unknown ids and bags
    that hold an id twice are errors that name the ids and the bag.
    """
    row_of = {c: r for r, c in enumerate(cocoids)}
    for k, bag in enumerate(bag_cocoids):
        check_distinct_bag(bag, f"bag {k}")
    unknown = [c for bag in bag_cocoids for c in bag if c not in row_of]
    if unknown:
        raise KeyError(f"{len(unknown)} image ids of the bags are not in {where}, e.g. {unknown[:5]}: "
                       "were the bags mined on another split?")
    return [[row_of[c] for c in bag] for bag in bag_cocoids]


__all__ = [
    "RANDOM",
    "BagBatchSampler",
    "BagCollator",
    "BagCurriculumCallback",
    "BagView",
    "bags_from_cocoids",
    "parse_bag_schedule",
]
