"""Self-retrieval R@1 against random distractors (RD100, DiscriTune) or given image sets (ImageCoDe)."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import datasets
import evaluate
import torch

from .caption_metric import CaptionMetric, split_missing
from .clip_judge import (
    DEFAULT_JUDGE,
    bag_recall_at_1,
    clip_s,
    get_judge,
    random_distractors,
    resolve_image_embeddings,
    similarity,
)
# evaluate.load copies only the siblings a module script imports itself: clip_judge.py needs this one
from .image_loading import open_image

__all__ = ["SelfRetrieval", "load_imagecode"]

_CITATION = """\
@inproceedings{dessi2023cross,
  title     = {Cross-Domain Image Captioning with Discriminative Finetuning},
  author    = {Dess{\\`\\i}, Roberto and Bevilacqua, Michele and Gualdoni, Eleonora and
               Carraz Rakotonirina, Nathana{\\"e}l and Franzon, Francesca and Baroni, Marco},
  booktitle = {CVPR},
  year      = {2023}
}
@inproceedings{krojer2022image,
  title     = {Image Retrieval from Contextual Descriptions},
  author    = {Krojer, Benno and Adlakha, Vaibhav and Vineet, Vibhav and Goyal, Yash and
               Ponti, Edoardo and Reddy, Siva},
  booktitle = {ACL},
  year      = {2022}
}
"""

_DESCRIPTION = """\
Self-retrieval (SR) evaluation of captions with a frozen CLIP judge: a caption is correct iff its
own image has a strictly higher cosine similarity than every candidate distractor (ties count as
wrong). Two settings:

* random distractors (default, RD100 of DiscriTune / NDLB Sec. 3.3): each image of the evaluated
  set is ranked against `num_distractors` (99) others drawn uniformly without replacement from the
  same set with a fixed-seed numpy generator;
* given image sets (`image_sets` + `targets`), e.g. ImageCoDe's sets of 10 similar video frames or
  static images (NDLB Sec. 5; `load_imagecode` reads its released JSON + images folder).

Also returns the mean ClipSc = 100 * max(cos(caption, own image), 0) (the authors' CLIP score,
no prompt). A missing caption (None) is counted as wrong and 0 ClipSc and reported.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `None`): one caption per evaluated image (random mode) or per
        image set's target (set mode); `None` = missing caption (counted as wrong).
    images (`list`, optional): random mode: the evaluated images aligned with `predictions` (PIL,
        paths or datasets `{"bytes", "path"}` dicts). Give this or `image_embeddings`.
    image_embeddings (array-like (N, d), optional): random mode: precomputed judge embeddings.
    ids (`list`, optional): random mode: image ids, keys of the judge's embedding cache.
    num_distractors (`int`, default 99): random mode: distractors per image (99 = RD100).
    seed (`int`, default 0): random mode: seed of the distractor sampling.
    image_sets (`list` of `list`, optional): set mode: each set's images (PIL / paths / dicts) or an
        array-like (K, d) of precomputed embeddings.
    targets (`list` of `int`, optional): set mode: index of the captioned image in each set.
    image_set_ids (`list` of `list`, optional): set mode: image ids (cache keys; identical ids are
        embedded once).
    groups (`list` of `str`, optional): a label per prediction; R@1 is also reported per label
        (e.g. ImageCoDe "video" / "static").
    judge (`str` or `ClipJudge`, default `"openai/clip-vit-base-patch32"`), judge_pretrained,
        device, batch_size, cache_dir: the CLIP judge (see the `truematch` module).
    return_details (`bool`, default False): also return `correct` (per prediction) and, in random
        mode, `candidates` (row i = [i, distractors...]).
Returns:
    recall_at_1 (`float`): fraction of captions that retrieve their image.
    recall_at_1_<group> (`float`): the same per group label, when `groups` is given.
    clipsc (`float`): the paper's ClipSc, mean 100 * max(cos(caption, own image), 0) (0-100; not
        Hessel's CLIPScore of the `clip_score` module).
    num_candidates (`int`): images each caption is ranked among (1 + distractors; set mode: the
        largest set size).
    num_captions (`int`), num_missing (`int`), missing (`list` of ids or indices).
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
    >>> colours = ["red", "blue", "green", "white", "black", "yellow"]
    >>> images = [Image.new("RGB", (32, 32), c) for c in colours]
    >>> sr = evaluate.load("metrics/self_retrieval")
    >>> rd = sr.compute(predictions=[f"a {c} square" for c in colours], images=images,
    ...                 num_distractors=3, seed=0, judge=judge)            # RD4 on 6 images
    >>> rd["num_candidates"], rd["num_captions"]
    (4, 6)
    >>> sets = sr.compute(predictions=["a blue square", None], image_sets=[images[:3], images[3:]],
    ...                   targets=[1, 0], judge=judge)                     # given image sets
    >>> sets["missing"], sets["recall_at_1"] <= 0.5
    ([1], True)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SelfRetrieval(CaptionMetric):
    """RD-k and image-set self-retrieval on the shared CLIP-scoring core."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://github.com/manugaurdl/no-detail-left-behind",
                            "https://github.com/McGill-NLP/imagecode"],
        )

    def _compute(self, predictions, images=None, image_embeddings=None, ids=None, num_distractors=99,
                 seed=0, image_sets=None, targets=None, image_set_ids=None, groups=None,
                 judge=DEFAULT_JUDGE, judge_backend="auto", judge_pretrained=None, device=None,
                 batch_size=64, cache_dir=None, return_details=False, progress=False):
        predictions, missing_mask = split_missing(predictions)  # None = a missing caption
        n = len(predictions)
        if groups is not None and len(groups) != n:
            raise ValueError(f"got {n} predictions but {len(groups)} groups")
        judge = get_judge(judge, backend=judge_backend, pretrained=judge_pretrained, device=device,
                          batch_size=batch_size, cache_dir=cache_dir)
        have = [i for i in range(n) if not missing_mask[i]]
        txt = judge.embed_texts([predictions[i] for i in have], progress=progress)
        trow = {i: r for r, i in enumerate(have)}

        correct, own_cos, extra = [False] * n, [0.0] * n, {}
        if image_sets is None:  # random distractors (RD-k)
            if targets is not None:
                raise ValueError("`targets` needs `image_sets`")
            if images is not None and len(images) != n:
                raise ValueError(f"got {n} predictions but {len(images)} images")
            img = resolve_image_embeddings(judge, images, image_embeddings, ids=ids, n=n, progress=progress)
            cand = random_distractors(n, num_distractors, seed)  # (n, 1 + k), target in column 0
            for s in range(0, len(have), 1024):  # row blocks keep (P, N) small
                rows = have[s: s + 1024]
                sim = similarity(txt[s: s + len(rows)], img)  # (B, N)
                sim = sim.gather(1, torch.as_tensor(cand[rows]))  # (B, 1 + k), target in column 0
                hits = bag_recall_at_1(sim, target=0)
                for r, i in enumerate(rows):
                    correct[i], own_cos[i] = bool(hits[r]), float(sim[r, 0])
            num_candidates = 1 + num_distractors
            if return_details:
                extra["candidates"] = cand.tolist()
            labels = ids
        else:  # given image sets
            if targets is None or len(targets) != n or len(image_sets) != n:
                raise ValueError(f"set mode needs one image set and one target per prediction ({n})")
            set_emb = _embed_sets(judge, image_sets, image_set_ids, progress)
            for i, (emb, tgt) in enumerate(zip(set_emb, targets)):
                if not 0 <= int(tgt) < emb.shape[0]:
                    raise ValueError(f"target {tgt} of set {i} is outside its {emb.shape[0]} images")
                if missing_mask[i]:
                    continue
                sim = similarity(txt[trow[i]][None], emb)  # (1, K)
                correct[i] = bool(bag_recall_at_1(sim, target=int(tgt))[0])
                own_cos[i] = float(sim[0, int(tgt)])
            num_candidates = max((e.shape[0] for e in set_emb), default=0)
            labels = [ids_[int(t)] for ids_, t in zip(image_set_ids, targets)] if image_set_ids is not None else None

        missing = [labels[i] if labels is not None else i for i in range(n) if missing_mask[i]]
        scores = clip_s(torch.tensor(own_cos)).tolist()
        out = {
            "recall_at_1": sum(correct) / n if n else float("nan"),
            "clipsc": sum(s for i, s in enumerate(scores) if not missing_mask[i]) / n if n else float("nan"),
            "num_candidates": num_candidates,
            "num_captions": n,
            "num_missing": len(missing),
            "missing": missing,
        }
        if groups is not None:
            by = defaultdict(list)
            for g, c in zip(groups, correct):
                by[g].append(c)
            for g in sorted(by):
                out[f"recall_at_1_{g}"] = sum(by[g]) / len(by[g])
        if return_details:
            out["correct"] = correct
            out.update(extra)
        return out


def _embed_sets(judge, image_sets, image_set_ids, progress) -> list[torch.Tensor]:
    """Embed every set's images once (identical ids or paths are embedded once)."""
    if image_set_ids is not None and len(image_set_ids) != len(image_sets):
        raise ValueError("`image_set_ids` needs one list of ids per image set")
    out: list[torch.Tensor | None] = [None] * len(image_sets)
    flat, flat_ids, where, seen = [], [], [], {}
    for s, images in enumerate(image_sets):
        if isinstance(images, torch.Tensor) or hasattr(images, "shape"):  # precomputed (K, d)
            out[s] = resolve_image_embeddings(judge, image_embeddings=images)
            continue
        rows = []
        for k, im in enumerate(images):
            key = None
            if image_set_ids is not None:
                key = ("id", str(image_set_ids[s][k]))
            elif isinstance(im, (str, os.PathLike)):
                key = ("path", str(im))
            if key is None or key not in seen:
                if key is not None:
                    seen[key] = len(flat)
                rows.append(len(flat))
                flat.append(im)
                flat_ids.append(image_set_ids[s][k] if image_set_ids is not None else None)
            else:
                rows.append(seen[key])
        where.append((s, rows))
    if flat:
        emb = judge.embed_images(flat, ids=flat_ids if image_set_ids is not None else None, progress=progress)
        for s, rows in where:
            out[s] = emb[rows]
    return out


def load_imagecode(data_json: str | os.PathLike, images_dir: str | os.PathLike) -> dict:
    """Read an ImageCoDe split as released (github.com/McGill-NLP/imagecode).

    ``data_json`` is e.g. ``data/valid_data.json``: ``{image-set folder: {image index: description}}``;
    ``images_dir`` holds ``<set folder>/img<i>.jpg`` (the ``image-sets`` archive). The images of a
    set are ordered by ``i`` and the index in the JSON refers to that order (as in the dataset's own
    loaders). One sample per (set, index) pair.

    Returns:
        dict with lists ``ids`` (``"<set>/img<i>"``, the caption-file key of the target image),
        ``image_sets`` (sorted image paths), ``image_set_ids`` (``"<set>/img<j>"`` per image),
        ``targets`` (int), ``descriptions`` (the human descriptions) and ``groups`` (``"video"``, or
        ``"static"`` for open-images sets).
    """
    data_json, images_dir = Path(data_json), Path(images_dir)
    try:
        data = json.loads(data_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read the ImageCoDe descriptions {str(data_json)!r}: {e}") from e
    out = {k: [] for k in ("ids", "image_sets", "image_set_ids", "targets", "descriptions", "groups")}
    for set_name, sents in data.items():
        folder = images_dir / set_name
        files = sorted(folder.glob("img*.jpg"), key=_frame_number)
        if not files:
            raise FileNotFoundError(f"no img<i>.jpg images for ImageCoDe set {set_name!r} in {str(folder)!r}")
        names = [f"{set_name}/{f.stem}" for f in files]
        for idx, text in sents.items():
            idx = int(idx)
            if not 0 <= idx < len(files):
                raise ValueError(f"ImageCoDe set {set_name!r} has {len(files)} images but index {idx}")
            out["ids"].append(names[idx])
            out["image_sets"].append([str(f) for f in files])
            out["image_set_ids"].append(names)
            out["targets"].append(idx)
            out["descriptions"].append(text.strip())
            out["groups"].append("static" if "open-images" in set_name else "video")
    return out


def _frame_number(path: Path) -> int:
    m = re.fullmatch(r"img(\d+)", path.stem)
    return int(m.group(1)) if m else 10**9
