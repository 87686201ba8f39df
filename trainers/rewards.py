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
  the training references (Sec. 4.8, App. C.4: R = SR + lambda * CIDEr, lambda = 0.5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from metrics.clip_judge import ClipJudge, bag_mask, retrieval_scores, similarity


def _log(log_metric: Callable[[str, float], None] | None, name: str, value: float) -> None:
    if log_metric is not None:
        log_metric(name, value)


class SelfRetrievalReward:
    """Self-retrieval reward (NDLB Sec. 4.1, Eq. 1; DiscriTune Sec. 3).

    ``R(c, i, D) = log softmax_{i' in D u {i}} sim(c, i')`` with raw cosine similarities from a
    frozen CLIP judge (no logit scale, as in the authors' code; ``temperature`` divides the
    similarities). The candidates of a caption are every distinct image of the call, i.e. of the
    training batch; since a batch is made of whole hard-negative bags, a caption's distractors are
    its bag-mates plus the other bags' images. ``within_bag=True`` restricts them to the caption's
    own bag (needs a ``bag_id`` column).

    Judge image embeddings are computed once per image id and cached (in memory, and on disk when
    the judge has a ``cache_dir``); per step only the captions are embedded.

    Args:
        judge: the frozen CLIP judge (never trained).
        id_column: batch column identifying an image (default ``"cocoid"``).
        image_column: batch column holding the image, used the first time an id is seen.
        image_embeds: optional precomputed ``{id: (d,) tensor}`` judge embeddings.
        temperature: divides the cosine similarities (1.0 = the paper).
        within_bag: distractors = own bag only.

    Logs ``sr/in_batch_r1`` (share of captions whose image scores strictly highest) through
    ``log_metric`` when the trainer provides it.
    """

    __name__ = "self_retrieval"

    def __init__(self, judge: ClipJudge, id_column: str = "cocoid", image_column: str = "image",
                 image_embeds: Mapping[Any, torch.Tensor] | None = None, temperature: float = 1.0,
                 within_bag: bool = False):
        self.judge = judge
        self.id_column = id_column
        self.image_column = image_column
        self.temperature = temperature
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
        log_prob, correct = retrieval_scores(sim, target, mask=mask, temperature=self.temperature)
        _log(log_metric, "sr/in_batch_r1", correct.float().mean().item())
        _log(log_metric, "sr/num_candidates", float(len(unique) if mask is None else mask.sum(1).float().mean()))
        return log_prob.tolist()


class CiderReward:
    """CIDEr-D of each caption against its image's references (Rennie et al. 2017; NDLB Sec. 4.8).

    Document frequencies come once from the training references (``train_references``), not from
    the batch, so a caption's score does not depend on what else is in the batch. A completion's
    references are those of its image id (the ``id_column`` of the batch) in ``train_references``.

    Args:
        train_references: ``{image id: [reference, ...]}`` for the whole training set (e.g. the
            COCO captions, or HolisticCap to reward faithfulness to it).
        id_column: batch column identifying an image.
    """

    __name__ = "cider"

    def __init__(self, train_references: Mapping[Any, Sequence[str]], id_column: str = "cocoid"):
        from metrics.cider import CiderD

        self.id_column = id_column
        self.scorer = CiderD({key: list(refs) for key, refs in train_references.items()})

    def __call__(self, completions: list[str], **kwargs) -> list[float]:
        _, per_caption = self.scorer.score(list(completions), ids=list(kwargs[self.id_column]))
        return [float(s) for s in per_caption]


__all__ = ["CiderReward", "SelfRetrievalReward"]
