"""The one CLIP-scoring core: a frozen CLIP "judge" and the self-retrieval maths on its embeddings.

Everything that compares captions with images in this project goes through this file: the SR
reward (paper Sec. 4.1, Eq. 1), TrueMatch R@1 (Sec. 3), RD100 and ImageCoDe self-retrieval
(Sec. 3.3 / 5, the DiscriTune protocol), the paper's ClipSc, CLIPScore / RefCLIPScore and the
bag mining of Alg. 1-2.

Two parts:

* :class:`ClipJudge` wraps a transformers CLIP model (``CLIPModel``, default
  ``openai/clip-vit-base-patch32``) or any ``open_clip`` model (``ViT-B-32`` + a pretrained tag).
  It embeds images and texts in batches without gradients, L2-normalised, with 77-token
  truncation that never fails on long or empty captions, and optionally caches image embeddings
  on disk keyed by (judge name, image id).
* Pure functions on embeddings (torch tensors; shapes in each docstring): :func:`similarity`,
  :func:`bag_log_softmax` (Eq. 1), :func:`bag_recall_at_1` (a caption is correct iff its image
  scores strictly higher than every other candidate; ties count as wrong),
  :func:`retrieval_scores` (both at once, what the SR reward calls), :func:`bag_mask`,
  :func:`random_distractors` (RD100) and :func:`clip_s` (the paper's ClipSc).

This file is also vendored into each ``metrics/<module>/`` folder (a symlink that ``evaluate``
dereferences when it copies a module), so it must only import third-party libraries and its one
sibling ``image_loading.py`` (the project's image loader, linked into the same folders).

Example (the maths on a hand-written similarity matrix)::

    >>> import torch
    >>> sim = torch.tensor([[0.3, 0.1, 0.3], [0.2, 0.4, 0.1]])   # 2 captions x 3 images
    >>> bag_recall_at_1(sim, target=torch.tensor([0, 1])).tolist()  # row 0 ties -> wrong
    [False, True]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .image_loading import open_image

__all__ = [
    "ClipJudge",
    "similarity",
    "bag_log_softmax",
    "bag_recall_at_1",
    "retrieval_scores",
    "bag_mask",
    "random_distractors",
    "clip_s",
    "load_image",
    "get_judge",
    "resolve_image_embeddings",
    "DEFAULT_JUDGE",
    "bf16_available",
    "resolve_dtype",
]

DEFAULT_JUDGE = "openai/clip-vit-base-patch32"
_CACHE_FORMAT = "ndlb-judge-embeddings-v1"
_FLUSH_EVERY = 4096  # cached embeddings per shard file


# ----------------------------------------------------------------------------------------------
# pure functions on embeddings
# ----------------------------------------------------------------------------------------------


def similarity(text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarities between captions and images.

    Args:
        text_emb: (T, d) caption embeddings.
        image_emb: (I, d) image embeddings (normalised or not; both are re-normalised).

    Returns:
        (T, I) float tensor, ``sim[t, i] = cos(text_emb[t], image_emb[i])``.
    """
    text_emb = F.normalize(text_emb.float(), dim=-1)
    image_emb = F.normalize(image_emb.to(text_emb.device).float(), dim=-1)
    return text_emb @ image_emb.T  # (T, I)


def _check_mask(sim: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = torch.as_tensor(mask, dtype=torch.bool, device=sim.device)
    if mask.shape != sim.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but sim has shape {tuple(sim.shape)}")
    return mask


def _as_target(sim: torch.Tensor, target: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(target, dtype=torch.long, device=sim.device)
    if t.dim() == 0:
        t = t.expand(sim.shape[0])
    if t.shape != (sim.shape[0],):
        raise ValueError(f"target must be an int or have shape ({sim.shape[0]},), got {tuple(t.shape)}")
    if sim.shape[0] and (t.min() < 0 or t.max() >= sim.shape[1]):
        raise ValueError(f"target indices must lie in [0, {sim.shape[1]}), got {t.tolist()}")
    return t


def bag_log_softmax(sim: torch.Tensor, mask: torch.Tensor | None = None,
                    scale: float = 1.0) -> torch.Tensor:
    """Row-wise log-softmax of scaled similarities over each caption's candidates (paper Eq. 1).

    ``R(c, i, D) = log( exp(s * sim(c, i)) / sum_{i' in D u {i}} exp(s * sim(c, i')) )``. The
    authors' code scales by the judge's logit scale, ``s = exp(logit_scale)`` (= 100 for OpenAI
    CLIP): their ``finetuning/receiver.py`` multiplies the normalised text features by
    ``clip.logit_scale.exp()`` before the dot product with the normalised image features
    (:attr:`ClipJudge.logit_scale` gives it). ``scale=1`` gives raw cosines.

    Args:
        sim: (T, I) caption-vs-image cosine similarities (from :func:`similarity`). For one bag
            per caption, use (T, K) with the bag's images as columns.
        mask: optional (T, I) bool, True where image i is a candidate for caption t (its bag);
            other entries get log-probability ``-inf``. None = every image is a candidate.
        scale: multiplies ``sim`` before the softmax (must be > 0).

    Returns:
        (T, I) log-probabilities; ``out[t, target[t]]`` is the Eq. 1 reward.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    logits = sim.float() * float(scale)
    mask = _check_mask(sim, mask)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def bag_recall_at_1(sim: torch.Tensor, target: int | Sequence[int] | torch.Tensor = 0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-retrieval R@1 per caption: is the caption's own image strictly the best candidate?

    A caption is correct iff ``sim[t, target[t]] > sim[t, i']`` for every other candidate i'
    (paper Sec. 3, "sim(c, i) > sim(c, i') for all i' in D"). Ties count as wrong (the authors'
    ``argmax`` would count a tie with the target in column 0 as correct; we do not).

    Args:
        sim: (T, I) similarities.
        target: int (same column for every row; 0 = "target in column 0") or (T,) long tensor.
        mask: optional (T, I) bool of candidates (True = in the caption's bag); must include the
            target. None = all images.

    Returns:
        (T,) bool tensor.
    """
    return retrieval_scores(sim, target, mask)[1]


def retrieval_scores(sim: torch.Tensor, target: int | Sequence[int] | torch.Tensor = 0,
                     mask: torch.Tensor | None = None,
                     scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 log-probability of the target and R@1 correctness, per caption.

    This is what the SR reward calls: ``sim`` is (captions x batch images), ``target`` each
    caption's own image column, and ``mask`` optionally restricts each caption's distractors
    to its own bag (see :func:`bag_mask`). TrueMatch bag R@1 is the same call with the mask =
    bag membership.

    Args:
        sim: (T, I) similarities.
        target: int or (T,) long tensor of target columns.
        mask: optional (T, I) bool of allowed candidates; must be True at the targets.
        scale: multiplies ``sim`` in the softmax only (R@1 does not depend on a positive scale);
            the SR reward passes the judge's logit scale (:func:`bag_log_softmax`).

    Returns:
        ``(log_prob, correct)``: (T,) float log-probability of the target (Eq. 1) and (T,) bool
        R@1 (strictly higher than every other allowed image; ties wrong; a bag of one is correct).
    """
    t = _as_target(sim, target)
    mask = _check_mask(sim, mask)
    rows = torch.arange(sim.shape[0], device=sim.device)
    if mask is not None and sim.shape[0] and not bool(mask[rows, t].all()):
        bad = (~mask[rows, t]).nonzero().flatten().tolist()
        raise ValueError(f"mask excludes the target image for caption rows {bad}")
    log_prob = bag_log_softmax(sim, mask, scale)[rows, t]  # (T,)
    sim = sim.float()
    target_sim = sim[rows, t]  # (T,)
    others = sim.clone()
    if mask is not None:
        others = others.masked_fill(~mask, float("-inf"))
    others[rows, t] = float("-inf")
    best_other = others.max(dim=-1).values if sim.shape[1] else target_sim.new_full(target_sim.shape, float("-inf"))
    return log_prob, target_sim > best_other


def bag_mask(caption_bags: Sequence[int] | torch.Tensor, image_bags: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Candidate mask from bag labels: ``mask[t, i] = caption_bags[t] == image_bags[i]``.

    Args:
        caption_bags: (T,) bag id of each caption.
        image_bags: (I,) bag id of each image.

    Returns:
        (T, I) bool tensor for the ``mask`` argument of :func:`retrieval_scores`.
    """
    c = torch.as_tensor(caption_bags).reshape(-1, 1)
    i = torch.as_tensor(image_bags).reshape(1, -1)
    return c == i


def random_distractors(n: int, num_distractors: int = 99, seed: int = 0) -> np.ndarray:
    """RD-style random candidate sets (DiscriTune protocol, RD100 = 99 distractors).

    For each image ``i`` of an evaluated set of ``n`` images, ``num_distractors`` other images
    are drawn uniformly without replacement from the remaining ``n - 1`` with a
    ``numpy.random.default_rng(seed)`` generator (deterministic for a given n, k and seed).

    Returns:
        (n, 1 + num_distractors) int64 array; row i = ``[i, d_1, ..., d_k]`` (target in column 0).
    """
    if num_distractors < 0:
        raise ValueError(f"num_distractors must be >= 0, got {num_distractors}")
    if n - 1 < num_distractors:
        raise ValueError(f"{num_distractors} distractors need at least {num_distractors + 1} images, got {n}")
    rng = np.random.default_rng(seed)
    out = np.empty((n, 1 + num_distractors), dtype=np.int64)
    for i in range(n):
        d = rng.choice(n - 1, size=num_distractors, replace=False)
        out[i, 0] = i
        out[i, 1:] = d + (d >= i)  # skip the target itself
    return out


def clip_s(cos: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """The paper's ClipSc per caption: ``scale * max(cos(caption, image), 0)``.

    With ``scale=100`` this is the "ClipSc" column of NDLB Tables 2-3 (the authors' code: raw
    caption, no prompt). CLIPScore (Hessel et al. 2021) is ``2.5 * max(cos, 0)`` with the
    "A photo depicts" prompt: see ``metrics/clip_score``.
    """
    return scale * cos.float().clamp(min=0)


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------


def load_image(image: Any):
    """Open one image as RGB PIL, transparency composited on white: a PIL image, a path, a URL,
    encoded bytes or a datasets ``{"bytes", "path"}`` dict. This is the project's one loader
    (``image_loading.open_image``, shared with the captioner: see that file for how it is vendored);
    raises ``OSError`` naming the image when it cannot be read."""
    return open_image(image)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns BaseModelOutputWithPooling from get_*_features; older ones a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _exp_logit_scale(model: Any) -> float | None:
    """``exp(model.logit_scale)``: the multiplier CLIP applies to cosine similarities (transformers
    ``CLIPModel.logit_scale`` and open_clip ``CLIP.logit_scale`` both store its log); None when the
    model has none."""
    param = getattr(model, "logit_scale", None)
    if param is None:
        return None
    return float(torch.as_tensor(param).detach().float().exp().item())


class _TransformersBackend:
    """transformers CLIP-like model (``get_text_features`` / ``get_image_features``)."""

    def __init__(self, model, tokenizer, image_processor):
        for fn in ("get_text_features", "get_image_features"):
            if not hasattr(model, fn):
                raise TypeError(f"{type(model).__name__} has no {fn}(); the judge must be a CLIP-like dual encoder")
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        cfg = getattr(model.config, "text_config", model.config)
        limits = [getattr(cfg, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        self.context_length = min(int(x) for x in limits if x is not None and x > 0) if any(limits) else 77
        self.embed_dim = getattr(model.config, "projection_dim", None)
        self.logit_scale = _exp_logit_scale(model)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids truncated to the context, each ending with the tokenizer's eos token.

        CLIP pools the text at its eos token, so a tokenizer that does not append one (a GPT-2
        style BPE) gets it appended here; a truncated caption keeps eos as its last token.
        """
        tok, L = self.tokenizer, self.context_length
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
        rows = tok(texts, truncation=True, max_length=L, add_special_tokens=True)["input_ids"]
        fixed = []
        for ids in rows:
            ids = list(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids[: L - 1] + [eos]
            fixed.append(ids)
        width = max(1, max(len(r) for r in fixed))
        input_ids = torch.full((len(fixed), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(fixed), width), dtype=torch.long)
        for r, ids in enumerate(fixed):
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def encode_texts(self, texts: list[str], device: torch.device) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        return _pooled(self.model.get_text_features(**batch))

    def preprocess(self, images: list) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return _pooled(self.model.get_image_features(pixel_values=pixel_values.to(dtype)))


class _OpenAIClipTransform:
    """OpenAI CLIP's own eval transform (``clip/clip.py`` ``_transform``, what the paper's judge
    saw): torchvision ``Resize`` (bicubic, short side, on the PIL image), ``CenterCrop`` (offset
    rounded; transformers' CLIP image processor rounds it down, so a 640x427 image is cropped at
    column 55 instead of 56), RGB, ``ToTensor``, normalise; sizes, mean and std from a transformers
    CLIP image processor. Called like that processor."""

    def __init__(self, image_processor):
        from torchvision import transforms as T

        size, crop = image_processor.size, image_processor.crop_size  # dicts or SizeDicts
        short, height, width = size.get("shortest_edge"), crop.get("height"), crop.get("width")
        if short is None:
            raise ValueError(f"OpenAI preprocessing needs an image processor that resizes the short side, got "
                             f"size={size!r}")
        self.transform = T.Compose([
            T.Resize(short, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop((height, width)),
            lambda image: image.convert("RGB"), T.ToTensor(),
            T.Normalize(list(image_processor.image_mean), list(image_processor.image_std)),
        ])

    def __call__(self, images: list, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([self.transform(image) for image in images])}


class _OpenClipBackend:
    """Any open_clip model (``encode_text`` / ``encode_image``) with its tokenizer and transform."""

    def __init__(self, model, preprocess, tokenizer):
        self.model, self._preprocess, self.tokenizer = model, preprocess, tokenizer
        self.context_length = getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77)
        self.embed_dim = getattr(getattr(model, "visual", None), "output_dim", None)
        self.logit_scale = _exp_logit_scale(model)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """open_clip tokenizers truncate to their context and keep the end-of-text token."""
        return {"input_ids": self.tokenizer(texts)}

    def encode_texts(self, texts: list[str], device: torch.device) -> torch.Tensor:
        return self.model.encode_text(self.tokenize(texts)["input_ids"].to(device))

    def preprocess(self, images: list) -> torch.Tensor:
        return torch.stack([self._preprocess(im) for im in images])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(pixel_values.to(dtype))


# ----------------------------------------------------------------------------------------------
# on-disk embedding cache
# ----------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    """A folder name for a judge: readable prefix + hash of the exact name."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-.")[-60:] or "judge"
    return f"{readable}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"


class _EmbeddingCache:
    """Image embeddings on disk under ``root/<judge slug>/``, keyed by ``str(image id)``.

    Append-only safetensors shards (tensor ``embeddings`` (n, d), metadata ``ids`` = JSON list),
    each written to a temporary file and renamed into place, so concurrent or interrupted runs
    never leave a half-written shard; a later shard wins for an id written twice.
    """

    def __init__(self, root: str | os.PathLike, judge_name: str):
        self.dir = Path(root) / _slug(judge_name)
        self.judge_name = judge_name
        self._index: dict[str, tuple[Path, int]] = {}
        self._indexed: set[str] = set()

    def _refresh(self) -> None:
        from safetensors import safe_open

        if not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("*.safetensors")):
            if shard.name in self._indexed:
                continue
            with safe_open(str(shard), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != _CACHE_FORMAT:
                continue
            for row, key in enumerate(json.loads(meta["ids"])):
                self._index[key] = (shard, row)
            self._indexed.add(shard.name)

    def get(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Embeddings found for ``keys`` (missing keys are absent from the result)."""
        from safetensors import safe_open

        self._refresh()
        by_shard: dict[Path, list[tuple[str, int]]] = {}
        for k in dict.fromkeys(keys):
            if k in self._index:
                shard, row = self._index[k]
                by_shard.setdefault(shard, []).append((k, row))
        found = {}
        for shard, items in by_shard.items():
            with safe_open(str(shard), framework="pt") as f:
                emb = f.get_tensor("embeddings")
            for k, row in items:
                found[k] = emb[row]
        return found

    def put(self, keys: list[str], emb: torch.Tensor) -> None:
        from safetensors.torch import save_file

        if not keys:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"shard-{uuid.uuid4().hex}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"embeddings": emb.detach().float().cpu().contiguous()}, tmp,
                      metadata={"format": _CACHE_FORMAT, "judge": self.judge_name, "ids": json.dumps(keys)})
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        for row, k in enumerate(keys):
            self._index[k] = (final, row)
        self._indexed.add(final.name)


# ----------------------------------------------------------------------------------------------
# the judge
# ----------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The one reading of a ``--device`` option: None or ``"auto"`` = CUDA when available, else
    the CPU; anything else (``"cpu"``, ``"cuda:1"``, a torch device) as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bf16_available(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 runs natively on `device`: a CUDA GPU with bf16, or a CPU with AMX or AVX-512
    bf16 instructions (read from /proc/cpuinfo; elsewhere False)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"`` = bfloat16 where :func:`bf16_available`, else float32; None = float32; a name
    (``"bfloat16"``, ``"float32"``, ``"bf16"``, ``"fp32"``, ``"float16"``) or a torch dtype as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {None: torch.float32, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if bf16_available(device) else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return names[dtype]


def _batches(n: int, size: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, n, size)
    return tqdm(starts, desc=desc, unit="batch", disable=not progress or n <= size)


class ClipJudge:
    """A frozen CLIP "judge" (transformers CLIP-like model or open_clip) that embeds images and texts.

    Attributes:
        name: the judge's id, e.g. ``"openai/clip-vit-base-patch32"`` or a folder path.
        cache_key: what cached image embeddings are keyed by (with the image id): the name, plus a
            fingerprint of the weight files for a local folder (so a retrained judge saved in the
            same folder never reads stale embeddings).
        embed_dim: dimension of the joint embedding space.
        device: where the model runs; outputs are always float32 on CPU.
        context_length: text tokens the judge sees (77 for CLIP); longer captions are truncated.
        logit_scale: ``exp(logit_scale)`` of the judge's weights, the multiplier CLIP applies to
            cosines (100.0 for OpenAI CLIP); the SR reward's default scale (Eq. 1). None when the
            model has no logit scale.

    Build one with :meth:`from_pretrained` (Hub id, local transformers folder, open_clip model
    name + pretrained tag, or an open_clip ``local-dir``), :meth:`from_transformers` or
    :meth:`from_open_clip` (already-loaded objects).

    Example::

        >>> judge = ClipJudge.from_pretrained("openai/clip-vit-base-patch32")   # doctest: +SKIP
        >>> img = judge.embed_images(["cat.jpg", "dog.jpg"], ids=["cat", "dog"])  # doctest: +SKIP
        >>> txt = judge.embed_texts(["a cat on a sofa", "a dog on a lawn"])      # doctest: +SKIP
        >>> bag_recall_at_1(similarity(txt, img), target=torch.arange(2))      # doctest: +SKIP
    """

    def __init__(self, backend: _TransformersBackend | _OpenClipBackend, *, name: str,
                 device: str | torch.device | None = None, batch_size: int = 64,
                 cache_dir: str | os.PathLike | None = None, cache_key: str | None = None,
                 dtype: str | torch.dtype | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._backend = backend
        self.name = name
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)  # the weights' dtype; embeddings are float32
        # what the embedding cache is keyed by (with the image id); bf16 embeddings are not fp32 ones
        self.cache_key = (cache_key or name) + ("" if self.dtype == torch.float32 else f"@{self.dtype}")
        self.batch_size = batch_size
        self.model = backend.model.to(self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.context_length = int(backend.context_length)
        self._cache = _EmbeddingCache(cache_dir, self.cache_key) if cache_dir is not None else None
        self._embed_dim = backend.embed_dim
        self.logit_scale: float | None = backend.logit_scale

    def __repr__(self) -> str:
        return (f"ClipJudge(name={self.name!r}, backend={self.backend}, device={str(self.device)!r}, "
                f"context_length={self.context_length})")

    @property
    def backend(self) -> str:
        return "open_clip" if isinstance(self._backend, _OpenClipBackend) else "transformers"

    @property
    def embed_dim(self) -> int:
        if self._embed_dim is None:  # not in the config: measure once
            self._embed_dim = int(self.embed_texts([""]).shape[1])
        return int(self._embed_dim)

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_JUDGE, *, backend: str = "auto",
                        pretrained: str | None = None, device: str | None = None, batch_size: int = 64,
                        cache_dir: str | None = None, dtype: str | torch.dtype | None = None,
                        openai_preprocessing: bool | None = None) -> "ClipJudge":
        """Load a judge by name.

        Args:
            name_or_path: a transformers CLIP Hub id or saved folder (``config.json`` + tokenizer +
                image processor files), or an open_clip model name (``"ViT-B-32"``),
                ``"hf-hub:org/repo"``, or a folder with ``open_clip_config.json`` (open_clip's
                ``local-dir`` layout).
            backend: ``"auto"`` (open_clip when ``pretrained`` is given, the name has an open_clip
                schema or is a known open_clip architecture, or the folder holds
                ``open_clip_config.json``; transformers otherwise), ``"transformers"`` or ``"open_clip"``.
            pretrained: open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``) or a local
                checkpoint file for the architecture ``name_or_path``.
            device: ``None`` = cuda when available, else cpu.
            batch_size: images / texts per forward pass.
            cache_dir: folder for the on-disk image-embedding cache (None = no cache).
            dtype: weights dtype: None/``"float32"``, ``"bfloat16"``, or ``"auto"`` (bf16 where the
                device has it, see :func:`resolve_dtype`). Embeddings are returned in float32.
            openai_preprocessing: transformers judges only: preprocess images with OpenAI CLIP's own
                transform (pixel values equal to ``clip.load(...)[1]``'s, see
                :class:`_OpenAIClipTransform`) instead of the checkpoint's image processor.
                ``None`` = for the ``openai/clip-*`` Hub checkpoints.
        """
        if backend not in ("auto", "transformers", "open_clip"):
            raise ValueError(f"backend must be 'auto', 'transformers' or 'open_clip', got {backend!r}")
        if backend == "auto":
            backend = "open_clip" if _looks_open_clip(name_or_path, pretrained) else "transformers"
        kw = dict(device=device, batch_size=batch_size, cache_dir=cache_dir, dtype=dtype)
        if os.path.isdir(name_or_path):
            kw["cache_key"] = f"{Path(name_or_path).resolve()}@{_folder_fingerprint(name_or_path)}"
        if backend == "transformers":
            if pretrained is not None:
                raise ValueError("`pretrained` is an open_clip tag; a transformers judge is named by name_or_path alone")
            from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

            model = AutoModel.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            image_processor = AutoImageProcessor.from_pretrained(name_or_path)
            if openai_preprocessing is None:
                openai_preprocessing = str(name_or_path).startswith("openai/clip-")
            if openai_preprocessing:  # other pixels than the processor's: other cached embeddings
                image_processor = _OpenAIClipTransform(image_processor)
                kw["cache_key"] = kw.get("cache_key", str(name_or_path)) + "|openai-transform"
            return cls.from_transformers(model, tokenizer, image_processor, name=str(name_or_path), **kw)

        import open_clip

        model_name = name_or_path
        if os.path.isdir(name_or_path) and (Path(name_or_path) / "open_clip_config.json").is_file():
            model_name = "local-dir:" + str(name_or_path)
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(model_name)
        name = f"open_clip:{name_or_path}" + (f":{pretrained}" if pretrained else "")
        return cls.from_open_clip(model, preprocess, tokenizer, name=name, **kw)

    @classmethod
    def from_transformers(cls, model, tokenizer, image_processor, *, name: str, **kw) -> "ClipJudge":
        """Wrap a loaded transformers CLIP-like model, its tokenizer and image processor.

        ``kw``: ``device``, ``batch_size``, ``cache_dir`` as in :meth:`from_pretrained`, and
        ``cache_key`` (default: ``name``).
        """
        return cls(_TransformersBackend(model, tokenizer, image_processor), name=name, **kw)

    @classmethod
    def from_open_clip(cls, model, preprocess, tokenizer, *, name: str, **kw) -> "ClipJudge":
        """Wrap a loaded open_clip model, its eval transform and tokenizer (``open_clip.get_tokenizer``)."""
        return cls(_OpenClipBackend(model, preprocess, tokenizer), name=name, **kw)

    # -- embedding -----------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The exact token ids the judge embeds (``input_ids`` (N, L), and ``attention_mask`` for
        transformers): use it to train a judge with the same text pipeline."""
        return self._backend.tokenize(list(texts))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        """Embed captions.

        Args:
            texts: N strings; long ones are truncated to :attr:`context_length` tokens, empty
                ones are embedded as an empty caption.
            progress: show a tqdm bar.

        Returns:
            (N, d) float32, L2-normalised, on CPU.
        """
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        out = []
        for s in _batches(len(texts), self.batch_size, progress, "judge: texts"):
            emb = self._backend.encode_texts(texts[s: s + self.batch_size], self.device)
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        if not out:
            return torch.empty(0, self._embed_dim or 0)
        return torch.cat(out)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Any] | torch.Tensor, ids: Sequence[Any] | None = None,
                     progress: bool = False) -> torch.Tensor:
        """Embed images.

        Args:
            images: N PIL images, paths or datasets ``{"bytes", "path"}`` dicts (opened lazily per
                batch), or an (N, 3, H, W) float tensor of already-preprocessed pixel values.
            ids: optional N image ids; with a ``cache_dir`` the embeddings are looked up in / written
                to the on-disk cache under (judge name, ``str(id)``), so nothing is recomputed.
            progress: show a tqdm bar.

        Returns:
            (N, d) float32, L2-normalised, on CPU.
        """
        n = len(images)
        if ids is not None and len(ids) != n:
            raise ValueError(f"got {n} images but {len(ids)} ids")
        keys = [str(i) for i in ids] if ids is not None else None
        rows: list[torch.Tensor | None] = [None] * n
        todo = list(range(n))
        if self._cache is not None and keys is not None:
            found = self._cache.get(keys)
            for j, k in enumerate(keys):
                if k in found:
                    rows[j] = found[k]
            todo = [j for j in range(n) if rows[j] is None]

        pending_keys: list[str] = []
        pending: list[torch.Tensor] = []
        for s in _batches(len(todo), self.batch_size, progress, "judge: images"):
            idx = todo[s: s + self.batch_size]
            if isinstance(images, torch.Tensor):
                pixels = images[idx]
            else:
                pixels = self._backend.preprocess([load_image(images[j]) for j in idx])
            emb = F.normalize(self._backend.encode_images(pixels.to(self.device)).float(), dim=-1).cpu()
            for j, e in zip(idx, emb):
                rows[j] = e
            if self._cache is not None and keys is not None:
                pending_keys += [keys[j] for j in idx]
                pending.append(emb)
                if len(pending_keys) >= _FLUSH_EVERY:
                    self._cache.put(pending_keys, torch.cat(pending))
                    pending_keys, pending = [], []
        if self._cache is not None and pending_keys:
            self._cache.put(pending_keys, torch.cat(pending))
        if n == 0:
            return torch.empty(0, self._embed_dim or 0)
        return torch.stack(rows)  # (N, d)


_JUDGES: dict[tuple, ClipJudge] = {}


def get_judge(judge: "ClipJudge | str | None" = None, **kwargs) -> "ClipJudge":
    """The judge to score with: ``judge`` itself if it is already a judge (anything with
    ``embed_texts`` / ``embed_images``), else ``ClipJudge.from_pretrained(judge or DEFAULT_JUDGE,
    **kwargs)``, loaded once per process for the same arguments."""
    if judge is not None and not isinstance(judge, (str, os.PathLike)):
        if not (hasattr(judge, "embed_texts") and hasattr(judge, "embed_images")):
            raise TypeError(f"judge must be a name or a ClipJudge, got {type(judge).__name__}")
        return judge
    name = str(judge or DEFAULT_JUDGE)
    key = (name, *sorted((k, str(v)) for k, v in kwargs.items()))
    if key not in _JUDGES:
        _JUDGES[key] = ClipJudge.from_pretrained(name, **kwargs)
    return _JUDGES[key]


def resolve_image_embeddings(judge: "ClipJudge", images: Sequence[Any] | torch.Tensor | None = None,
                             image_embeddings: Any = None, ids: Sequence[Any] | None = None,
                             n: int | None = None, progress: bool = False) -> torch.Tensor:
    """(N, d) L2-normalised image embeddings from either ``images`` (embedded by the judge,
    cached by ``ids`` when the judge has a cache) or precomputed ``image_embeddings`` (array-like
    (N, d), used as given after normalisation). ``n``: the expected N (checked)."""
    if (images is None) == (image_embeddings is None):
        raise ValueError("give exactly one of `images` or `image_embeddings`")
    if image_embeddings is not None:
        if isinstance(image_embeddings, torch.Tensor):
            emb = image_embeddings.detach().float().cpu()
        else:
            emb = torch.as_tensor(np.asarray(image_embeddings, dtype=np.float32))
        emb = F.normalize(emb, dim=-1) if emb.dim() == 2 else emb
    else:
        emb = judge.embed_images(images, ids=ids, progress=progress)
    if emb.dim() != 2:
        raise ValueError(f"image embeddings must be (N, d), got shape {tuple(emb.shape)}")
    if n is not None and emb.shape[0] != n:
        raise ValueError(f"expected {n} images (one per prediction), got {emb.shape[0]}")
    return emb


def _folder_fingerprint(folder: str | os.PathLike) -> str:
    """Names, sizes and modification times of a model folder's files (cheap; changes on re-save)."""
    h = hashlib.sha1()
    for f in sorted(Path(folder).iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def _looks_open_clip(name: str, pretrained: str | None) -> bool:
    if pretrained is not None or name.startswith(("hf-hub:", "local-dir:")):
        return True
    if os.path.isdir(name):
        return (Path(name) / "open_clip_config.json").is_file()
    try:
        import open_clip
    except ImportError:
        return False
    return name in open_clip.list_models()
