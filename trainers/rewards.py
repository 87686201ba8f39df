"""Reward functions for self-retrieval fine-tuning, with TRL's calling convention.

Each reward is a small callable class called the way TRL's ``GRPOTrainer._calculate_rewards``
calls reward functions::

    reward_func(prompts=..., completions=[caption, ...], completion_ids=[[id, ...], ...],
                trainer_state=..., log_metric=..., log_extra=..., **batch_columns) -> list[float | None]

``batch_columns`` are the dataset columns of each completion's image (repeated once per sampled
caption), e.g. ``cocoid``, ``image``, ``captions``, ``bag_id``. ``None`` means "no reward for this
completion" and is excluded when rewards are combined with ``reward_weights``. Any TRL user's
reward function with this signature plugs into :class:`trainers.SRTrainer` unchanged.

- :class:`SelfRetrievalReward`: NDLB Eq. 1 (Sec. 4.1), as the authors' code computes it.
- :class:`CiderReward`: CIDEr-D against the image's references, with document frequencies from
  the training references or, as the authors, from the batch (Sec. 4.8, App. C.4:
  R = SR + lambda * CIDEr, lambda = 0.5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from metrics.clip_judge import ClipJudge, bag_mask, retrieval_scores, similarity


def _log(log_metric: Callable[[str, float], None] | None, name: str, value: float) -> None:
    if log_metric is not None:
        log_metric(name, value)


def resolve_scale(judge: Any, scale: float | str = "judge") -> float:
    """The multiplier of the cosines in Eq. 1: the judge's logit scale for ``"judge"``, else ``scale``."""
    if isinstance(scale, str):
        if scale != "judge":
            try:
                scale = float(scale)
            except ValueError:
                raise ValueError(f"scale must be 'judge' or a positive number, got {scale!r}") from None
        else:
            value = getattr(judge, "logit_scale", None)
            if value is None:
                raise ValueError(f"the judge {getattr(judge, 'name', type(judge).__name__)!r} has no logit scale; "
                                 "pass a number as the SR reward's scale (1.0 = raw cosines)")
            scale = value
    if not float(scale) > 0:
        raise ValueError(f"the SR reward's scale must be > 0, got {scale}")
    return float(scale)


class SelfRetrievalReward:
    """Self-retrieval reward (NDLB Sec. 4.1, Eq. 1; DiscriTune Sec. 3).

    ``R(c, i, D) = log softmax_{i' in D u {i}} (s * cos(c, i'))`` from a frozen CLIP judge, with
    ``s`` the judge's logit scale ``exp(logit_scale)`` (100 for OpenAI CLIP), as the authors'
    code computes it: ``finetuning/receiver.py`` multiplies the normalised caption embedding by
    ``clip.logit_scale.exp()`` and ``finetuning/losses.py`` takes the cross-entropy over the batch.
    The candidates of a caption are every distinct image of the call, i.e. of the training batch;
    since a batch is made of whole hard-negative bags, a caption's distractors are its bag-mates
    plus the other bags' images. ``within_bag=True`` restricts them to the caption's own bag
    (needs a ``bag_id`` column).

    Judge image embeddings are computed once per image id and cached (in memory, and on disk when
    the judge has a ``cache_dir``); per step only the captions are embedded.

    Args:
        judge: the frozen CLIP judge (never trained).
        id_column: batch column identifying an image (default ``"cocoid"``).
        image_column: batch column holding the image, used the first time an id is seen.
        image_embeds: optional precomputed ``{id: (d,) tensor}`` judge embeddings.
        scale: ``"judge"`` (default) = the judge's own :attr:`~metrics.clip_judge.ClipJudge.logit_scale`;
            a positive float overrides it (``1.0`` = raw cosines).
        within_bag: distractors = own bag only.

    Logs ``sr/in_batch_r1`` (share of captions whose image scores strictly highest) and
    ``sr/num_candidates`` through ``log_metric`` when the trainer provides it.
    """

    __name__ = "self_retrieval"

    def __init__(self, judge: ClipJudge, id_column: str = "cocoid", image_column: str = "image",
                 image_embeds: Mapping[Any, torch.Tensor] | None = None, scale: float | str = "judge",
                 within_bag: bool = False):
        self.judge = judge
        self.id_column = id_column
        self.image_column = image_column
        self.scale = resolve_scale(judge, scale)
        self.within_bag = within_bag
        self._image_embeds: dict[Any, torch.Tensor] = dict(image_embeds or {})

    def image_embeddings(self, ids: Sequence[Any], images: Sequence[Any] | None) -> torch.Tensor:
        """(len(ids), d) judge embeddings, computing (once) those not seen before."""
        missing = list(dict.fromkeys(i for i in ids if i not in self._image_embeds))
        if missing:
            if images is None:
                raise KeyError(f"no judge embedding for image ids {missing[:5]} and no "
                               f"'{self.image_column}' column to compute them from")
            first = {i: im for i, im in zip(ids, images)}
            embeds = self.judge.embed_images([first[i] for i in missing], ids=missing)
            self._image_embeds.update(zip(missing, embeds))
        return torch.stack([self._image_embeds[i] for i in ids])

    def __call__(self, completions: list[str], log_metric=None, **kwargs) -> list[float]:
        ids = kwargs[self.id_column]
        unique = list(dict.fromkeys(ids))  # the batch's distinct images, in first-seen order
        column = {image_id: j for j, image_id in enumerate(unique)}
        images = kwargs.get(self.image_column)
        first_images = None
        if images is not None:
            by_id = dict(zip(ids, images))
            first_images = [by_id[i] for i in unique]
        image_emb = self.image_embeddings(unique, first_images)  # (I, d)
        text_emb = self.judge.embed_texts(completions)  # (T, d)
        sim = similarity(text_emb, image_emb)  # (T, I)
        target = torch.tensor([column[i] for i in ids])
        mask = None
        if self.within_bag:
            if "bag_id" not in kwargs:
                raise KeyError("within_bag=True needs a 'bag_id' column in the batch")
            image_bag = dict(zip(ids, kwargs["bag_id"]))
            mask = bag_mask(kwargs["bag_id"], [image_bag[i] for i in unique])
        log_prob, correct = retrieval_scores(sim, target, mask=mask, scale=self.scale)
        _log(log_metric, "sr/in_batch_r1", correct.float().mean().item())
        _log(log_metric, "sr/num_candidates", float(len(unique) if mask is None else mask.sum(1).float().mean()))
        return log_prob.tolist()


def as_references(value: Any, column: str, image_id: Any = None) -> list[str]:
    """One image's references as a list of strings: a single string (HolisticCap, BlendCap) is
    one reference; a list/tuple of strings is kept. Anything else is an error naming the column."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(r, str) for r in value):
        return list(value)
    where = f"column {column!r}" + (f" of image {image_id!r}" if image_id is not None else "")
    raise TypeError(f"{where} holds {type(value).__name__} {str(value)[:60]!r}: CIDEr references must be a "
                    "string or a non-empty list of strings")


class CiderReward:
    """CIDEr-D of each caption against its image's references (Rennie et al. 2017; NDLB Sec. 4.8).

    Where the document frequencies (DF) come from:

    - ``document_frequency="corpus"`` (default, standard SCST): once from the training references
      ``train_references``, so a caption's score does not depend on what else is in the batch;
      a completion's references are those of its image id in ``train_references``.
    - ``document_frequency="batch"``: from the references of the distinct images of each call (the
      training batch), read from the batch column ``references_column``, as the authors' code does
      (``finetuning/losses.py``, ``CiderReward``: pycocoevalcap's CIDEr-D on the batch).

    Args:
        train_references: ``{image id: references}`` for the whole training set (needed for
            ``"corpus"``); a reference entry may be one string (HolisticCap) or a list of strings.
        id_column: batch column identifying an image.
        references_column: batch column of references (``"batch"`` DF), and the column named in
            errors.
        document_frequency: ``"corpus"`` or ``"batch"``.
    """

    __name__ = "cider"

    def __init__(self, train_references: Mapping[Any, str | Sequence[str]] | None = None,
                 id_column: str = "cocoid", references_column: str = "captions",
                 document_frequency: str = "corpus"):
        from metrics.cider import CiderD

        if document_frequency not in ("corpus", "batch"):
            raise ValueError(f"document_frequency must be 'corpus' or 'batch', got {document_frequency!r}")
        self.id_column = id_column
        self.references_column = references_column
        self.document_frequency = document_frequency
        self.scorer = None
        if document_frequency == "corpus":
            if not train_references:
                raise ValueError("document_frequency='corpus' needs the training references (train_references)")
            self.scorer = CiderD({key: as_references(refs, references_column, key)
                                  for key, refs in train_references.items()})

    @classmethod
    def from_dataset(cls, dataset, id_column: str = "cocoid", references_column: str = "captions",
                     document_frequency: str = "corpus") -> "CiderReward":
        """Build the reward from a training dataset's id and reference columns."""
        for column in (id_column, references_column):
            if column not in dataset.column_names:
                raise KeyError(f"the training dataset has no {column!r} column (columns: {dataset.column_names})")
        references = dict(zip(dataset[id_column], dataset[references_column]))
        return cls(references if document_frequency == "corpus" else None, id_column=id_column,
                   references_column=references_column, document_frequency=document_frequency)

    def __call__(self, completions: list[str], **kwargs) -> list[float]:
        ids = list(kwargs[self.id_column])
        scorer = self.scorer
        if scorer is None:  # DF from this batch's distinct images
            from metrics.cider import CiderD

            if self.references_column not in kwargs:
                raise KeyError(f"document_frequency='batch' needs the {self.references_column!r} column in the batch")
            batch = dict(zip(ids, kwargs[self.references_column]))
            scorer = CiderD({key: as_references(refs, self.references_column, key) for key, refs in batch.items()})
        _, per_caption = scorer.score(list(completions), ids=ids)
        return [float(s) for s in per_caption]


__all__ = ["CiderReward", "SelfRetrievalReward", "as_references", "resolve_scale"]
