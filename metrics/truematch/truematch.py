"""TrueMatch: self-retrieval R@1 of captions within bags of highly similar images (NDLB Sec. 3)."""

from __future__ import annotations

import numbers
from collections import defaultdict

import datasets
import evaluate
import torch

from .caption_metric import CaptionMetric, split_missing
from .clip_judge import DEFAULT_JUDGE, bag_recall_at_1, clip_s, get_judge, resolve_image_embeddings, similarity
# evaluate.load copies only the siblings a module script imports itself: clip_judge.py needs this one
from .image_loading import open_image

__all__ = ["Truematch"]

# A vendored copy of publishing.citations.bibtex(*METRIC_CITATIONS["truematch"]) (this module loads
# standalone); tests/test_citations.py checks that the two are equal.
_CITATION = """\
@article{gaur2024detect,
  title   = {No Detail Left Behind: Revisiting Self-Retrieval for Fine-Grained Image Captioning},
  author  = {Gaur, Manu and Singh S, Darshan and Tapaswi, Makarand},
  journal = {arXiv preprint arXiv:2409.03025},
  year    = {2024}
}
"""

_DESCRIPTION = """\
TrueMatch evaluates whether captions are fine-grained enough to pick their own image out of a bag
of highly similar images (NDLB, Sec. 3). Each image's caption and every image of its bag are
embedded by a frozen CLIP judge (ViT-B/32 in the paper); the caption is correct iff its own image
has a strictly higher cosine similarity than every other image of the bag (ties count as wrong).
R@1 is reported overall and per bag size (the paper's TrueMatch #3 / #5 / #7), together with the
mean ClipSc = 100 * max(cos(caption, own image), 0) (the authors' CLIP score, no prompt).
A missing caption (None) is counted as wrong (and scores 0 ClipSc) and reported, never dropped.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `None`): one caption per image; `None` = missing caption
        (counted as wrong).
    images (`list`, optional): the images, aligned with `predictions`: PIL images, file paths or
        datasets `{"bytes", "path"}` dicts. Give this or `image_embeddings`.
    image_embeddings (array-like (N, d), optional): precomputed image embeddings of the same judge.
    bags (`list` of `list`): the bags, each a list of indices into `predictions`, or of ids when
        `ids` is given. Bags of different sizes may be mixed; each size is reported.
    ids (`list`, optional): one id per prediction (e.g. COCO ids); bags may then be given as ids,
        and they key the judge's image-embedding cache.
    judge (`str` or `ClipJudge`, default `"openai/clip-vit-base-patch32"`): a transformers CLIP id
        or folder, an open_clip name (with `judge_pretrained`), or an already built `ClipJudge`.
    judge_backend (`str`, default "auto"): "transformers", "open_clip" or "auto" (by name).
    judge_pretrained (`str`, optional): open_clip pretrained tag, e.g. `"openai"`.
    device (`str`, optional): default cuda when available.
    batch_size (`int`, default 64), cache_dir (`str`, optional): passed to the judge.
    return_details (`bool`, default False): also return `per_bag` (bag ids and per-caption
        correctness).
Returns:
    recall_at_1 (`float`): fraction of (caption, bag) pairs retrieved, over all bags.
    recall_at_1_bag_<s> (`float`): the same over bags of size s (TrueMatch #s).
    num_bags_<s> (`int`): number of bags of size s.
    clipsc (`float`): the paper's ClipSc, mean 100 * max(cos, 0) between each bagged image and its caption
        (0-100; not Hessel's CLIPScore of the `clip_score` module).
    num_captions (`int`): (caption, bag) pairs scored.
    num_missing (`int`) and missing (`list`): images in a bag without a caption (ids or indices).
Examples:
    A tiny random judge so that the example runs offline; real use: `judge="openai/clip-vit-base-patch32"`.

    >>> import evaluate, open_clip, torch
    >>> from metrics.clip_judge import ClipJudge
    >>> from PIL import Image
    >>> _ = torch.manual_seed(0)
    >>> model = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": 1, "width": 32,
    ...     "patch_size": 8, "head_width": 16}, text_cfg={"context_length": 77, "vocab_size": 49408,
    ...     "width": 32, "heads": 2, "layers": 1})
    >>> judge = ClipJudge.from_open_clip(model, open_clip.image_transform(32, is_train=False),
    ...     open_clip.get_tokenizer("ViT-B-32"), name="tiny-random", device="cpu")
    >>> images = [Image.new("RGB", (32, 32), c) for c in ["red", "blue", "green", "white", "black"]]
    >>> truematch = evaluate.load("metrics/truematch")
    >>> results = truematch.compute(
    ...     predictions=["a red square", "a blue square", "a green square", "a white square", None],
    ...     images=images, bags=[[0, 1, 2], [1, 3, 4]], judge=judge)
    >>> results["num_bags_3"], results["num_captions"], results["missing"]
    (2, 6, [4])
    >>> 0.0 <= results["recall_at_1"] <= 5 / 6
    True
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Truematch(CaptionMetric):
    """TrueMatch bag R@1 (NDLB Sec. 3) on the shared CLIP-scoring core.

    Spelled ``Truematch``, not ``TrueMatch``: evaluate names a module after its class in snake case,
    and the module's name is ``truematch`` (``TrueMatch`` would make it ``true_match``)."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://github.com/manugaurdl/no-detail-left-behind"],
        )

    def _compute(self, predictions, bags=None, images=None, image_embeddings=None, ids=None,
                 judge=DEFAULT_JUDGE, judge_backend="auto", judge_pretrained=None, device=None,
                 batch_size=64, cache_dir=None, return_details=False, progress=False):
        predictions, missing_mask = split_missing(predictions)  # None = a missing caption
        n = len(predictions)
        if bags is None:
            raise ValueError("`bags` is required: a list of bags, each a list of indices (or ids)")
        bags_idx = _bags_as_indices(bags, ids, n)
        if images is not None and len(images) != n:
            raise ValueError(f"got {n} predictions but {len(images)} images")
        judge = get_judge(judge, backend=judge_backend, pretrained=judge_pretrained, device=device,
                          batch_size=batch_size, cache_dir=cache_dir)

        # embed every bagged image once, and the captions that exist
        used = sorted({i for bag in bags_idx for i in bag})
        if images is not None:
            img = resolve_image_embeddings(judge, images=[images[i] for i in used],
                                           ids=[ids[i] for i in used] if ids is not None else None,
                                           progress=progress)
        else:
            img = resolve_image_embeddings(judge, image_embeddings=image_embeddings, n=n)[used]
        row = {i: r for r, i in enumerate(used)}  # dataset index -> row of img
        have = [i for i in used if not missing_mask[i]]
        txt = judge.embed_texts([predictions[i] for i in have], progress=progress)
        trow = {i: r for r, i in enumerate(have)}

        # R@1 per bag: captions of the bag vs the bag's images, target on the diagonal
        correct_by_size, per_bag = defaultdict(list), []
        for bag in bags_idx:
            ok = [False] * len(bag)
            present = [k for k, i in enumerate(bag) if not missing_mask[i]]
            if present:
                sim = similarity(txt[[trow[bag[k]] for k in present]], img[[row[i] for i in bag]])  # (P, K)
                hits = bag_recall_at_1(sim, target=torch.tensor(present))
                for k, h in zip(present, hits.tolist()):
                    ok[k] = bool(h)
            correct_by_size[len(bag)] += ok
            per_bag.append({"bag": [_label(i, ids) for i in bag], "correct": ok})

        # ClipSc over each bagged image once (missing caption = 0)
        cos = (txt * img[[row[i] for i in have]]).sum(-1) if have else torch.zeros(0)
        scores = clip_s(cos).tolist() + [0.0] * (len(used) - len(have))
        all_ok = [c for v in correct_by_size.values() for c in v]
        missing = [_label(i, ids) for i in used if missing_mask[i]]
        out = {
            "recall_at_1": sum(all_ok) / len(all_ok) if all_ok else float("nan"),
            "clipsc": sum(scores) / len(scores) if scores else float("nan"),
            "num_captions": len(all_ok),
            "num_missing": len(missing),
            "missing": missing,
        }
        for size in sorted(correct_by_size):
            v = correct_by_size[size]
            out[f"recall_at_1_bag_{size}"] = sum(v) / len(v)
            out[f"num_bags_{size}"] = len(v) // size
        if return_details:
            out["per_bag"] = per_bag
        return out


def _label(i: int, ids):
    return ids[i] if ids is not None else i


def _bags_as_indices(bags, ids, n: int) -> list[list[int]]:
    """Bags as lists of row indices; with `ids`, bags may hold ids (checked, named when unknown)."""
    lookup = {str(v): i for i, v in enumerate(ids)} if ids is not None else None  # ids match as strings
    if lookup is not None and len(lookup) != len(ids):
        raise ValueError("`ids` contains duplicates")
    out = []
    for b, bag in enumerate(bags):
        bag = list(bag)
        if len(bag) < 2:
            raise ValueError(f"bag {b} has {len(bag)} image(s); a bag needs at least 2")
        if lookup is not None:
            unknown = [x for x in bag if str(x) not in lookup]
            if unknown:
                raise KeyError(f"bag {b} holds ids with no prediction/image: {unknown}")
            bag = [lookup[str(x)] for x in bag]
        else:
            bad = [x for x in bag if not (isinstance(x, numbers.Integral) and 0 <= x < n)]
            if bad:
                raise ValueError(f"bag {b} holds {bad}: give row indices in [0, {n}) or pass `ids`")
            bag = [int(x) for x in bag]
        if len(set(bag)) != len(bag):
            raise ValueError(f"bag {b} contains the same image twice: {bag}")
        out.append(bag)
    return out
