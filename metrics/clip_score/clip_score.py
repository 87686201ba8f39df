"""CLIPScore and RefCLIPScore (Hessel et al., 2021) on the shared CLIP-scoring core."""

from __future__ import annotations

import datasets
import evaluate
import torch

from .caption_metric import CaptionMetric, split_missing
from .clip_judge import DEFAULT_JUDGE, get_judge, resolve_image_embeddings
# evaluate.load copies only the siblings a module script imports itself: clip_judge.py needs this one
from .image_loading import open_image

__all__ = ["ClipScore"]

_CITATION = """\
@inproceedings{hessel2021clipscore,
  title     = {{CLIPScore}: A Reference-free Evaluation Metric for Image Captioning},
  author    = {Hessel, Jack and Holtzman, Ari and Forbes, Maxwell and Le Bras, Ronan and Choi, Yejin},
  booktitle = {EMNLP},
  year      = {2021}
}
"""

_DESCRIPTION = """\
CLIPScore (Hessel et al., 2021): CLIP-S(c, v) = w * max(cos(E_text(prompt + c), E_image(v)), 0)
with w = 2.5 and the prompt "A photo depicts " prepended to the caption, as in the authors'
reference implementation. With references, RefCLIP-S(c, R, v) is the harmonic mean of CLIP-S and
max(max_r cos(E_text(prompt + c), E_text(prompt + r)), 0) (references get the same prompt).
Scores are in [0, w]; the paper reports them x 100. A missing caption (None) scores 0 and is
reported. For the NDLB paper's own "ClipSc" (100 * max(cos, 0), no prompt) see the `truematch`
and `self_retrieval` modules (their `clipsc` key).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `None`): one caption per image; `None` = missing (scores 0).
    images (`list`, optional): the images aligned with `predictions` (PIL, paths or datasets
        `{"bytes", "path"}` dicts). Give this or `image_embeddings`.
    image_embeddings (array-like (N, d), optional): precomputed judge image embeddings.
    ids (`list`, optional): image ids, keys of the judge's image-embedding cache.
    references (`list` of `list` of `str`, optional): reference captions per image; adds
        RefCLIPScore.
    w (`float`, default 2.5): the CLIP-S weight.
    prompt (`str`, default "A photo depicts"): prepended (with a space) to captions and
        references; "" for none.
    judge (`str` or `ClipJudge`, default `"openai/clip-vit-base-patch32"`), judge_pretrained,
        device, batch_size, cache_dir: the CLIP judge (see the `truematch` module).
    return_details (`bool`, default False): also return per-caption `clip_scores` (and
        `refclip_scores`).
Returns:
    clip_score (`float`): mean CLIP-S.
    refclip_score (`float`): mean RefCLIP-S (only with `references`).
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
    >>> clip_score = evaluate.load("metrics/clip_score")
    >>> out = clip_score.compute(predictions=["a red square", "a blue square"],
    ...     images=[Image.new("RGB", (32, 32), c) for c in ["red", "blue"]],
    ...     references=[["a red square"], ["a small blue box", "blue"]], judge=judge)
    >>> sorted(out)
    ['clip_score', 'missing', 'num_captions', 'num_missing', 'refclip_score']
    >>> 0.0 <= out["clip_score"] <= 2.5 and 0.0 <= out["refclip_score"] <= 2.5
    True
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClipScore(CaptionMetric):
    """CLIP-S and RefCLIP-S (Hessel et al., 2021)."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://arxiv.org/abs/2104.08718", "https://github.com/jmhessel/clipscore"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """evaluate's `compute`; `references` (lists of reference captions, optional: RefCLIPScore)
        are an argument of the metric, not stored inputs."""
        if references is not None:
            kwargs["reference_captions"] = references
        return super().compute(predictions=predictions, **kwargs)

    def _compute(self, predictions, images=None, image_embeddings=None, ids=None, reference_captions=None,
                 w=2.5, prompt="A photo depicts", judge=DEFAULT_JUDGE, judge_backend="auto",
                 judge_pretrained=None, device=None, batch_size=64, cache_dir=None, return_details=False,
                 progress=False):
        predictions, missing_mask = split_missing(predictions)  # None = a missing caption
        n = len(predictions)
        if images is not None and len(images) != n:
            raise ValueError(f"got {n} predictions but {len(images)} images")
        refs = reference_captions
        if refs is not None and len(refs) != n:
            raise ValueError(f"got {n} predictions but {len(refs)} reference lists")
        judge = get_judge(judge, backend=judge_backend, pretrained=judge_pretrained, device=device,
                          batch_size=batch_size, cache_dir=cache_dir)
        prefix = prompt.rstrip() + " " if prompt else ""
        have = [i for i in range(n) if not missing_mask[i]]

        img = resolve_image_embeddings(judge, images, image_embeddings, ids=ids, n=n, progress=progress)
        txt = judge.embed_texts([prefix + predictions[i] for i in have], progress=progress)  # (P, d)
        clip = torch.zeros(n)
        if have:
            clip[have] = w * (txt * img[have]).sum(-1).clamp(min=0)  # CLIP-S per caption

        out = {"clip_score": float(clip.mean()) if n else float("nan")}
        if refs is not None:
            flat = [(i, r) for i in have for r in refs[i]]
            empty = [i for i in have if not refs[i]]
            if empty:
                raise ValueError(f"no reference captions for predictions {empty}")
            ref_emb = judge.embed_texts([prefix + r for _, r in flat], progress=progress)  # (R, d)
            best = torch.full((n,), float("-inf"))
            trow = {i: k for k, i in enumerate(have)}
            cos = (txt[[trow[i] for i, _ in flat]] * ref_emb).sum(-1)  # (R,)
            for (i, _), c in zip(flat, cos.tolist()):
                best[i] = max(float(best[i]), c)
            best = best.clamp(min=0)
            denom = clip + best
            ref_clip = torch.where(denom > 0, 2 * clip * best / denom.clamp(min=1e-12), torch.zeros(n))
            ref_clip[[i for i in range(n) if missing_mask[i]]] = 0.0
            out["refclip_score"] = float(ref_clip.mean()) if n else float("nan")
        missing = [ids[i] if ids is not None else i for i in range(n) if missing_mask[i]]
        out.update(num_captions=n, num_missing=len(missing), missing=missing)
        if return_details:
            out["clip_scores"] = clip.tolist()
            if refs is not None:
                out["refclip_scores"] = ref_clip.tolist()
        return out
