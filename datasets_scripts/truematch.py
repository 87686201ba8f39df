"""TrueMatch and training-bag mining: NDLB paper Sec. 3.1 and App. B (Algorithms 1 and 2, B.2).

Pipeline (``python -m datasets_scripts.truematch build``):

1. :func:`multimodal_embeddings` (Alg. 1 l.4-8): for every image, ``m = concat(z, t)`` with ``z``
   the normalised CLIP image embedding and ``t`` the normalised mean of the CLIP text embeddings
   of its captions. Computed in chunks that are cached on disk (a rerun reuses finished chunks).
2. :func:`knn` (Alg. 1 l.9): the ``k`` most similar *other* images of every image by cosine on
   ``m`` (the rows are normalised first, so cos = (cos_image + cos_text) / 2), per block of rows:
   memory O(block * N + N * k), never the N x N matrix.
3. :func:`candidate_bags` (Alg. 1 l.12-16): bag r = [r, its s-1 nearest neighbours],
   ``alpha_r`` = mean cosine between ``m_r`` and the s-1 others.
4. :func:`curate` (Alg. 2): bags sorted by alpha (descending, stable), a bag is kept only if
   none of its images is in an already kept bag.
5. :func:`training_bags` (App. B.2): disjoint hard bags over the train split from each image's
   top-200 neighbours, every image at most once per epoch.

True cosines, reproducible. The search ranks by the float64 cosine of the unit rows (within
~d * 2^-50 of it, ~1e-12 for d = 1024), ties broken by the lower index, and gives the same bits
whatever the block size, BLAS, thread count or device: a float32 matmul finds each row's
candidates with a proven safety margin, then each row's candidates are re-ranked with dot
products that are exact in float64 (:func:`split_unit_rows`, :func:`knn`).

Outputs are the training-bag files and the TrueMatch folder of docs/formats.md (see ``write_truematch`` and the CLI).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import string
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from publishing.citations import NDLB as NDLB_CITATION
from trainers.bags import check_distinct_bag

logger = logging.getLogger(__name__)

DEFAULT_MAX_BLOCK_BYTES = 512 * 2**20
CARD_TEMPLATE = Path(__file__).with_name("templates") / "truematch_card.md"
CITATION = NDLB_CITATION


# ---------------------------------------------------------------------------------------------
# Similarity search (Alg. 1 l.9)
# ---------------------------------------------------------------------------------------------

HI_BITS = 24  # hi = round(x * 2^24) * 2^-24: |hi_t| <= 1 on a grid of 2^-24, exact in float32


def _as_embeddings(m: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, d) CPU tensor; float64 stays float64, half and float32 become float32 (exact), others float64."""
    m = torch.as_tensor(m).detach().cpu()
    if m.dim() != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"expected a non-empty (N, d) embedding matrix, got shape {tuple(m.shape)}")
    if m.dtype == torch.float64:
        return m
    return m.float() if m.dtype in (torch.float32, torch.float16, torch.bfloat16) else m.double()


def _pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Float64 sum over the last dimension in a fixed pairwise order (element t with t + h, h the
    largest power of two below d, then halving), with elementwise operations only: the result
    does not depend on the batch shape, the thread count or the device, as a BLAS call or
    ``sum`` may (they may split or reorder the sum)."""
    s = x.to(torch.float64, copy=True)
    d = h = s.shape[-1]
    if d > 1:
        h = 1 << ((d - 1).bit_length() - 1)  # largest power of two < d, so d - h <= h
        s[..., : d - h] += s[..., h:]
        s = s[..., :h]
    while h > 1:
        h //= 2
        s[..., :h] += s[..., h: 2 * h]
    return s[..., 0]


def lo_bits(d: int) -> int:
    """Fractional bits of ``lo`` beyond ``hi`` (:func:`split_unit_rows`) for dimension d: the most
    (at most 25, so that lo is exact in float32) with every partial sum of hi.lo' + lo.hi' exact
    in float64, i.e. 2^b (2^24 + sqrt(d)/2) sqrt(d) <= 2^52."""
    b = min(25, math.floor(52 - math.log2((2**HI_BITS + math.sqrt(d) / 2) * math.sqrt(d))))
    if b < 1:
        raise ValueError(f"embedding dimension {d} is too large for the exact re-ranking")
    return b


def split_unit_rows(m: torch.Tensor | np.ndarray, chunk_rows: int = 4096) -> torch.Tensor:
    """The unit rows x = m / |m| (float64) as ``hl = [hi | lo]``, an (N, 2d) float32 tensor.

    ``hi = round(x 2^24) 2^-24`` and ``lo = round((x - hi) 2^(24+b)) 2^-(24+b)`` (b = :func:`lo_bits`)
    are integers times powers of two, exact in float32, and ``|hi + lo - x| <= 2^-(25+b)`` per
    entry. Products of such values are exact in float64 and, by Cauchy-Schwarz, every partial
    sum of ``hi.hi'`` and of ``hi.lo' + lo.hi'`` is an integer multiple of the grid below 2^53:
    these dot products are computed exactly by any float64 matmul, in any order, on any device.
    Norms use :func:`_pairwise_sum`. Raises if a row is zero or not finite.
    """
    m = _as_embeddings(m)
    n, d = m.shape
    b = lo_bits(d)
    hl = torch.empty(n, 2 * d)
    for s, c in zip(range(0, n, chunk_rows), m.split(chunk_rows)):
        c = c.double()
        norms = _pairwise_sum(c * c).sqrt_()
        bad = (~torch.isfinite(norms) | (norms == 0)).nonzero().flatten()
        if len(bad):
            raise ValueError(f"rows {(bad[:20] + s).tolist()} of the embeddings are zero or not finite; "
                             "cosine similarity is undefined for them")
        x = (c / norms[:, None]).mul_(2.0**HI_BITS)  # exact scaling
        hi = x.round()
        lo = x.sub_(hi).mul_(2.0**b).round_()  # x - hi is exact
        hl[s: s + len(c), :d] = hi.mul_(2.0**-HI_BITS)
        hl[s: s + len(c), d:] = lo.mul_(2.0**-(HI_BITS + b))
    return hl


def search_error_bound(d: int) -> float:
    """Bound on |float32 search similarity - re-ranking cosine| in dimension d (see :func:`knn`).

    The search multiplies the ``hi`` rows (|hi_t - x_t| <= 2^-25) in float32 in any summation
    order: |fl32(hi.hi') - hi.hi'| <= gamma_d |hi||hi'|, gamma_d = d u / (1 - d u), u = 2^-24
    (Higham, Accuracy and Stability of Numerical Algorithms, Sec. 3.1), and |hi.hi' - x.y| <=
    e (2 + e) with e = sqrt(d) 2^-25. The re-ranking cosine is within ~d 2^-50 of x.y; 1e-10 more
    covers it with a wide margin.
    """
    nu = d * 2.0**-24
    if nu >= 0.5:
        raise ValueError(f"embedding dimension {d} is too large for the float32 search bound")
    e = math.sqrt(d) * 2.0**-25
    return nu / (1 - nu) * (1 + e) ** 2 + e * (2 + e) + 1e-10


@contextlib.contextmanager
def _exact_float32_matmul():
    """Full-precision float32 matmuls (no TF32 / bf16 shortcuts), so that the bound holds."""
    prev = torch.get_float32_matmul_precision()
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32


@contextlib.contextmanager
def _intra_op_threads(n: int):
    """torch CPU operations on ``n`` threads inside the block (threads started in it too), then
    the previous setting again."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def auto_block_size(n: int, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> int:
    """Rows per block so that one (rows, N) float32 similarity block fits the budget."""
    return max(1, min(n, max_block_bytes // (4 * n)))


def _exact_cosines(hl: torch.Tensor, row: int, cand: torch.Tensor) -> torch.Tensor:
    """(C,) float64 cosines of row ``row`` with rows ``cand``: fl(hi.hi' + (hi.lo' + lo.hi')), both
    dot products exact (:func:`split_unit_rows`), so the result is the same bits on any BLAS."""
    d = hl.shape[1] // 2
    r = hl[row].double()
    w = torch.stack([torch.cat([r[:d], torch.zeros_like(r[:d])]), torch.cat([r[d:], r[:d]])], dim=1)  # (2d, 2)
    s = hl.index_select(0, cand).double() @ w  # (C, 2): hi.hi', hi.lo' + lo.hi'
    return s[:, 0] + s[:, 1]


def _top_k(cos: torch.Tensor, cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row of (R, C) candidates in the order (cosine descending, index ascending)."""
    cand, o = cand.sort(dim=1)  # index ascending, then a stable sort by cosine
    cos = cos.gather(1, o)
    o = torch.sort(cos, dim=1, descending=True, stable=True).indices[:, :k]
    return cos.gather(1, o), cand.gather(1, o)


def knn(m: torch.Tensor | np.ndarray, k: int, *, block_size: int | None = None,
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES, device: str | torch.device | None = None,
        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest other rows of every row of ``m`` by cosine similarity, blockwise.

    The unit rows are split into float32 ``hi + lo`` (:func:`split_unit_rows`), then per block
    of rows, never the N x N matrix (memory O(block_size * N + N * k)):

    1. Candidates: float32 similarities ``hi.hi'`` of the block to all N rows (one matmul) and
       their top ``k + margin``. These are within ``e`` = :func:`search_error_bound` of the
       cosines of step 2, so every true top-k neighbour of a row has a similarity >= (the
       row's k-th similarity) - 2e. A row whose window reaches past the kept candidates (many
       near-ties) takes every column above that floor.
    2. Re-ranking: the cosines of each row with its candidates, ``fl(hi.hi' + (hi.lo' +
       lo.hi'))`` with both dot products exact in float64 (within ~d 2^-50, ~1e-12 for d =
       1024, of the float64 cosine), sorted by cosine descending, ties by the lower index.

    The result is the exact top k under these cosines, the same bits for every block size,
    thread count and device: the float32 pass only chooses a superset of the neighbours.

    Args:
        m: (N, d) embeddings (any norm; rows are normalised).
        k: neighbours per row, 1 <= k <= N-1. A row is never its own neighbour.
        block_size: rows per similarity block (default: from ``max_block_bytes``).
        max_block_bytes: memory budget of one (block_size, N) float32 block (default 512 MiB).
        device: where the search runs (default CPU); results come back on CPU.
        progress: tqdm bar over blocks.

    Returns:
        ``(sims, idx)``: (N, k) float64 cosines and (N, k) int64 indices, each row sorted by
        cosine descending, ties by the lower index.
    """
    hl = split_unit_rows(m)
    n, d = hl.shape[0], hl.shape[1] // 2
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    hl = hl.to(dev)
    hi = hl[:, :d]  # (N, d) view
    margin = 2 * search_error_bound(d)
    kc = min(n - 1, k + max(8, k // 16))  # candidates kept per row; more only for wide windows
    rows = block_size or auto_block_size(n, max_block_bytes)
    cand = torch.empty(n, kc, dtype=torch.int64, device=dev)
    wide: dict[int, torch.Tensor] = {}  # rows whose window reaches past kc: every column above the floor
    buf = torch.empty(min(rows, n), n, device=dev)
    with _exact_float32_matmul(), torch.no_grad():
        # 1. candidates: float32 similarities of a block of rows to all rows
        for a in tqdm(range(0, n, rows), desc="Nearest neighbours", unit="block", disable=not progress):
            e = min(n, a + rows)
            sim = torch.matmul(hi[a:e], hi.T, out=buf[: e - a])  # (R, N) float32
            r = torch.arange(e - a, device=dev)
            sim[r, r + a] = float("-inf")  # never its own neighbour
            v, cand[a:e] = sim.topk(kc, dim=1)  # (R, kc), descending
            if kc < n - 1:
                floor = v[:, k - 1] - margin  # every true top-k neighbour has sim >= floor
                for q in (v[:, -1] >= floor).nonzero().flatten().tolist():
                    wide[a + q] = (sim[q] >= floor[q]).nonzero().flatten()
        del buf, sim
    # 2. exact cosines of each row with its candidates: many small operations, so one thread
    # each (more would mostly wait on each other) and rows spread over a pool of threads
    sims = torch.empty(n, k, dtype=torch.float64)
    idx = torch.empty(n, k, dtype=torch.int64)
    workers = torch.get_num_threads() if dev.type == "cpu" else 1
    step = 512
    with _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
        jobs = [pool.submit(_rerank_rows, hl, cand, wide, k, a, min(n, a + step), sims, idx) for a in range(0, n, step)]
        for job in tqdm(jobs, desc="Exact re-ranking", unit="rows", unit_scale=step, disable=not progress):
            job.result()
    return sims, idx


def _rerank_rows(hl: torch.Tensor, cand: torch.Tensor, wide: dict[int, torch.Tensor], k: int, a: int, e: int,
                 sims: torch.Tensor, idx: torch.Tensor) -> None:
    """Step 2 of :func:`knn` for rows a..e-1: writes their top k into ``sims`` and ``idx``."""
    kc = cand.shape[1]
    cos = torch.empty(e - a, kc, dtype=torch.float64, device=hl.device)
    narrow = torch.ones(e - a, dtype=torch.bool)
    for q in range(a, e):
        if q in wide:
            c = wide[q]
            cq = torch.cat([_exact_cosines(hl, q, part) for part in c.split(4 * kc)])
            vq, iq = _top_k(cq[None], c[None], k)
            sims[q], idx[q], narrow[q - a] = vq[0].cpu(), iq[0].cpu(), False
        else:
            cos[q - a] = _exact_cosines(hl, q, cand[q])
    keep = narrow.to(hl.device)
    v, i = _top_k(cos[keep], cand[a:e][keep], k)
    sims[a:e][narrow], idx[a:e][narrow] = v.cpu(), i.cpu()


def knn_reference(m: torch.Tensor | np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive reference for :func:`knn`: the full N x N float64 cosine matrix (one matmul of the
    float64 unit rows) and a stable sort per row (ties by the lower index).

    Its cosines differ from :func:`knn`'s by float64 rounding and the ~d 2^-50 of the split
    (~1e-12 for d = 1024), so the two agree on the neighbours wherever no two cosines of a row
    are closer than that. O(N^2) memory: for tests and benchmarks only.
    """
    m = _as_embeddings(m).double()
    n = m.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    x = m / torch.linalg.vector_norm(m, dim=1, keepdim=True)
    sim = x @ x.T  # (N, N)
    sim.fill_diagonal_(float("-inf"))
    v, i = torch.sort(sim, dim=1, descending=True, stable=True)
    return v[:, :k].clone(), i[:, :k].clone()


# ---------------------------------------------------------------------------------------------
# Algorithm 1 (candidate bags), Algorithm 2 (curation), App. B.2 (training bags)
# ---------------------------------------------------------------------------------------------

def bags_from_knn(sims: torch.Tensor, idx: torch.Tensor, bag_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alg. 1 l.12-16 from precomputed neighbours (:func:`knn` with k >= bag_size - 1)."""
    if bag_size < 2:
        raise ValueError(f"bag_size must be >= 2, got {bag_size}")
    if idx.shape[1] < bag_size - 1:
        raise ValueError(f"need >= {bag_size - 1} neighbours per row for bags of {bag_size}, got {idx.shape[1]}")
    n = idx.shape[0]
    bags = torch.cat([torch.arange(n, dtype=torch.int64)[:, None], idx[:, : bag_size - 1]], dim=1)
    alpha = _pairwise_sum(sims[:, : bag_size - 1]) / (bag_size - 1)  # fixed order: same bits everywhere
    return bags, alpha


def candidate_bags(m: torch.Tensor | np.ndarray, bag_size: int, **knn_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1: one candidate bag per image.

    Args:
        m: (N, d) multimodal embeddings (:func:`multimodal_embeddings`).
        bag_size: s >= 2 images per bag.
        **knn_kwargs: ``block_size``, ``max_block_bytes``, ``device``, ``progress`` of :func:`knn`.

    Returns:
        ``(bags, alpha)``: (N, s) int64 row indices, bag r = [r, its s-1 most similar other
        images in descending cosine, ties by lower index]; (N,) float64 ``alpha_r`` = mean cosine
        between m_r and the s-1 others (Alg. 1 l.14).
    """
    sims, idx = knn(m, bag_size - 1, **knn_kwargs)
    return bags_from_knn(sims, idx, bag_size)


def curate(bags: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
           alpha: torch.Tensor | np.ndarray | Sequence[float], *, return_indices: bool = False) -> list[list[int]] | tuple[list[list[int]], list[int]]:
    """Algorithm 2: keep the hardest bag of each visual concept.

    Bags are visited in descending ``alpha`` (a stable sort: equal alphas keep their input
    order), and a bag is kept only if none of its images is in an already kept bag.

    Returns:
        The kept bags (lists of row indices) in visiting order; with ``return_indices=True``
        also their positions in the input (to look up their alpha).
    """
    bags = np.asarray(bags, dtype=np.int64)
    alpha = np.asarray(alpha, dtype=np.float64)
    if bags.ndim != 2 or alpha.shape != (bags.shape[0],):
        raise ValueError(f"expected bags (T, s) and alpha (T,), got {bags.shape} and {alpha.shape}")
    if np.isnan(alpha).any():
        raise ValueError(f"alpha has NaN at bags {np.flatnonzero(np.isnan(alpha))[:20].tolist()}")
    used = np.zeros(int(bags.max()) + 1 if bags.size else 0, dtype=bool)
    kept: list[int] = []
    for r in np.argsort(-alpha, kind="stable"):
        if not used[bags[r]].any():
            used[bags[r]] = True
            kept.append(int(r))
    out = [bags[r].tolist() for r in kept]
    return (out, kept) if return_indices else out


def training_bags_from_knn(idx: torch.Tensor | np.ndarray, bag_size: int, seed: int = 0,
                           leftover: Literal["random", "drop"] = "random", return_stats: bool = False):
    """App. B.2 from precomputed neighbour lists ``idx`` (N, top_k); see :func:`training_bags`."""
    idx = np.asarray(idx, dtype=np.int64)
    n, top_k = idx.shape
    if bag_size < 2:
        raise ValueError(f"bag_size must be >= 2, got {bag_size}")
    if leftover not in ("random", "drop"):
        raise ValueError(f"leftover must be 'random' or 'drop', got {leftover!r}")
    if top_k < bag_size - 1:
        raise ValueError(f"top_k = {top_k} neighbours cannot fill bags of {bag_size}")
    rng = np.random.default_rng(seed)
    used = np.zeros(n, dtype=bool)
    bags: list[list[int]] = []
    for q in rng.permutation(n):  # the seed sets the query order
        if used[q]:
            continue
        nb = idx[q]
        free = nb[~used[nb]][: bag_size - 1]  # nearest first
        if len(free) < bag_size - 1:
            continue  # not enough unused neighbours now; q may still join a later query's bag
        bag = [int(q), *free.tolist()]
        used[bag] = True
        bags.append(bag)
    n_hard = len(bags)
    left = np.flatnonzero(~used)
    n_random_bags = 0
    if leftover == "random":
        rng.shuffle(left)
        n_random_bags = len(left) // bag_size
        bags += left[: n_random_bags * bag_size].reshape(-1, bag_size).tolist()
    n_dropped = n - bag_size * len(bags)
    stats = {"n_images": n, "bag_size": bag_size, "top_k": top_k, "seed": seed, "leftover": leftover,
             "n_hard_bags": n_hard, "n_random_bags": n_random_bags, "n_unplaced": int(len(left)),
             "n_dropped": int(n_dropped)}
    logger.info("training bags of %d: %d hard, %d random from %d leftover images, %d images not in any bag",
                bag_size, n_hard, n_random_bags, len(left), n_dropped)
    return (bags, stats) if return_stats else bags


def training_bags(m: torch.Tensor | np.ndarray, bag_size: int, top_k: int = 200, seed: int = 0, *,
                  leftover: Literal["random", "drop"] = "random", return_stats: bool = False,
                  **knn_kwargs: Any):
    """Training bags for SR fine-tuning (paper App. B.2, docs/formats.md: training-bag file).

    Queries are visited in a random order set by ``seed``; each unused query forms a bag with
    the first ``bag_size - 1`` of its ``top_k`` nearest neighbours (cosine on ``m``, as
    :func:`knn`) that are not in any bag yet. Every image is in at most one bag, so the bags are
    disjoint and unique; a new ``seed`` per epoch gives new bags.

    Images that cannot be placed (a query whose ``top_k`` list has fewer than ``bag_size - 1``
    unused images, and which no later query picks as a neighbour) are reported in the stats
    (``n_unplaced``) and, with ``leftover="random"`` (default), shuffled with the same seed and
    grouped into random bags of ``bag_size`` (easy bags, like DiscriTune's random distractors),
    appended after the hard bags; the last ``n_unplaced % bag_size`` images sit out this epoch
    (``n_dropped``). With ``leftover="drop"`` all unplaced images sit out the epoch.

    Returns:
        A list of bags (row indices into ``m``, query first, then neighbours nearest first; the
        first ``n_hard_bags`` are mined bags); with ``return_stats=True`` also a stats dict
        (``n_hard_bags``, ``n_random_bags``, ``n_unplaced``, ``n_dropped``, ...).
    """
    n = len(m)
    _, idx = knn(m, min(top_k, n - 1), **knn_kwargs)
    return training_bags_from_knn(idx, bag_size, seed, leftover, return_stats)


# ---------------------------------------------------------------------------------------------
# Multimodal embeddings (Alg. 1 l.4-8), cached on disk
# ---------------------------------------------------------------------------------------------

def _captions_hash(dataset, captions_column: str) -> str:
    h = hashlib.sha256()
    for batch in dataset.select_columns([captions_column]).iter(batch_size=4096):
        h.update(json.dumps(batch[captions_column]).encode())
    return h.hexdigest()[:16]


def multimodal_embeddings(dataset, judge, *, cache_dir: str | os.PathLike | None = None, chunk_size: int = 512,
                          image_column: str = "image", captions_column: str = "captions",
                          id_column: str = "cocoid", progress: bool = True) -> torch.Tensor:
    """Alg. 1 l.4-8: ``m = concat(normalised image embedding, normalised mean caption embedding)``.

    Args:
        dataset: a `datasets.Dataset` with an image column (decoded or not), a list-of-captions
            column and an id column (docs/formats.md: COCO dataset).
        judge: a `metrics.clip_judge.ClipJudge` (``embed_images`` / ``embed_texts``).
        cache_dir: folder for finished chunks (``chunk-XXXXX.npy``, written atomically) under a
            key of (judge name, ids, captions, chunk size); a rerun loads finished chunks and
            computes only the rest. None = no cache.
        chunk_size: rows embedded per chunk (and per cache file).
        progress: tqdm bar over chunks.

    Returns:
        (N, 2d) float32 tensor on CPU (each half has unit norm).
    """
    from datasets import Image

    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    ids = dataset[id_column]
    folder = None
    if cache_dir is not None:
        from datasets_scripts.coco import fingerprint_ids

        key = hashlib.sha256(json.dumps([getattr(judge, "cache_key", judge.name), fingerprint_ids(ids), _captions_hash(dataset, captions_column),
                                         chunk_size]).encode()).hexdigest()[:16]
        folder = Path(cache_dir) / f"mm-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "meta.json"
        if not meta.exists():
            meta.write_text(json.dumps({"judge": judge.name, "n": n, "chunk_size": chunk_size,
                                        "id_column": id_column, "first_ids": list(ids[:5])}))
    raw = dataset.cast_column(image_column, Image(decode=False)) if isinstance(
        dataset.features.get(image_column), Image) else dataset
    parts = []
    for c, s in enumerate(tqdm(range(0, n, chunk_size), desc="Multimodal embeddings", unit="chunk",
                               disable=not progress)):
        path = folder / f"chunk-{c:05d}.npy" if folder is not None else None
        if path is not None and path.exists():
            parts.append(torch.from_numpy(np.load(path)))
            continue
        rows = raw[s: s + chunk_size]
        missing = [ids[s + j] for j, im in enumerate(rows[image_column]) if im is None]
        if missing:
            raise ValueError(f"images missing for {id_column} {missing[:20]} (imported with --allow-missing?); "
                             "drop these rows (dataset.filter) or fix the images first")
        caps = rows[captions_column]
        empty = [ids[s + j] for j, cs in enumerate(caps) if not cs]
        if empty:
            raise ValueError(f"no captions for {id_column} {empty[:20]}")
        z = F.normalize(judge.embed_images(rows[image_column]).float(), dim=-1)  # (C, d)
        flat = [t for cs in caps for t in cs]
        owner = torch.repeat_interleave(torch.arange(len(caps)), torch.tensor([len(cs) for cs in caps]))
        t_all = judge.embed_texts(flat).float()  # (sum captions, d)
        t = torch.zeros(len(caps), t_all.shape[1]).index_add_(0, owner, t_all)  # sum; mean = same direction
        m = torch.cat([z, F.normalize(t, dim=-1)], dim=1)  # (C, 2d)
        if path is not None:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                np.save(f, m.numpy())
            os.replace(tmp, path)
        parts.append(m)
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# TrueMatch dataset folder (docs/formats.md: TrueMatch folder) and authors' format
# ---------------------------------------------------------------------------------------------

def bag_features():
    """`datasets.Features` of a TrueMatch config (one row per bag)."""
    from datasets import Features, Image, List, Value

    return Features({"bag_id": Value("int64"), "cocoids": List(Value("int64")), "images": List(Image()),
                     "captions": List(List(Value("string"))), "alpha": Value("float64")})


def write_json_atomic(path: Path, obj: Any, indent: int | None = None) -> None:
    """Write JSON to a temporary file and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def write_bags_parquet(path: Path, dataset, bags: list[list[int]], alpha: Sequence[float],
                       bag_ids: Sequence[int] | None = None, *, embed_images: bool = True,
                       image_column: str = "image", captions_column: str = "captions", id_column: str = "cocoid",
                       progress: bool = False) -> None:
    """Write one config's bags (row indices into ``dataset``) as a parquet file, atomically."""
    from datasets import Image
    from datasets.arrow_writer import ParquetWriter

    raw = dataset.cast_column(image_column, Image(decode=False))
    bag_ids = list(range(len(bags))) if bag_ids is None else list(bag_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = ParquetWriter(features=bag_features(), path=str(tmp), embed_local_files=embed_images)
    try:
        batch = 32
        for s in tqdm(range(0, len(bags), batch), desc=f"Writing {path.parent.name}", disable=not progress):
            rows = {"bag_id": [], "cocoids": [], "images": [], "captions": [], "alpha": []}
            for b, a, bid in zip(bags[s: s + batch], alpha[s: s + batch], bag_ids[s: s + batch]):
                got = raw[[int(r) for r in b]]
                images = []
                for cid, im in zip(got[id_column], got[image_column]):
                    if im is None:
                        raise ValueError(f"bag {bid}: image of {id_column} {cid} is missing")
                    if im.get("bytes") is not None:
                        im = {"bytes": im["bytes"], "path": os.path.basename(im.get("path") or f"{cid:012d}.jpg")}
                    images.append(im)
                rows["bag_id"].append(int(bid))
                rows["cocoids"].append([int(c) for c in got[id_column]])
                rows["images"].append(images)
                rows["captions"].append([list(c) for c in got[captions_column]])
                rows["alpha"].append(float(a))
            writer.write_batch(rows)
        writer.finalize()
    finally:
        writer.close()
    os.replace(tmp, path)


def render_card(info: dict[str, Any]) -> str:
    """The README.md dataset card of a TrueMatch folder from its ``mining_info.json`` dict."""
    sizes = sorted(int(s) for s in info["sizes"])
    configs = "\n".join(f"- config_name: bags_{s}\n  data_files:\n  - split: test\n    path: bags_{s}/test-*.parquet"
                        for s in sizes)
    review = info.get("review") or {}
    rows = []
    for s in sizes:
        r = review.get(str(s))
        rows.append(f"| bags_{s} | {s} | {info['candidates'][str(s)]} | {info['curated'][str(s)]} | "
                    + (f"{r['kept']} (dropped {r['dropped']}, undecided {r['undecided']}: {r['undecided_policy']})"
                       if r else "not reviewed") + " |")
    review_text = ("Bags were filtered by hand with the review page (`python -m datasets_scripts.review_bags`), "
                   "as in the paper (Sec. 3.1); the decisions are in `review/`." if review else
                   "These bags are not yet filtered by hand. The paper keeps only bags that require "
                   "fine-grained discrimination (e.g. 680 -> 254 bags of size 3): run "
                   "`python -m datasets_scripts.review_bags` on this folder, then `apply`.")
    cut = []
    if info.get("min_alpha") is not None:
        cut.append(f"alpha >= {info['min_alpha']}")
    if info.get("max_bags") is not None:
        cut.append(f"at most {info['max_bags']} bags per size (the highest alpha)")
    template = string.Template(CARD_TEMPLATE.read_text(encoding="utf-8"))
    return template.substitute(
        configs=configs, counts_table="\n".join(rows), judge=info["judge"], split=info["split"],
        n_images=info["n_images"], captions_column=info.get("captions_column", "captions"), sizes=", ".join(map(str, sizes)), review_text=review_text,
        cutoff=("; then kept " + " and ".join(cut)) if cut else "", citation=CITATION,
        first_size=sizes[len(sizes) // 2], size_category=_size_category(info, review))


def _size_category(info: dict[str, Any], review: dict[str, Any]) -> str:
    n = max([review[s]["kept"] if s in review else info["curated"][s] for s in info["curated"]], default=0)
    return "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K"


def write_truematch(out_dir: str | os.PathLike, dataset, curated: dict[int, tuple[list[list[int]], list[float]]],
                    info: dict[str, Any], *, embed_images: bool = True, captions_column: str = "captions",
                    progress: bool = True) -> Path:
    """Write a TrueMatch folder (docs/formats.md): per size ``bags_{s}/test-00000-of-00001.parquet``,
    the authors' ``{s}.json`` (lists of COCO ids) and ``alpha_{s}.json``, ``mining_info.json`` and
    the README.md card. ``curated[s] = (bags as row indices into dataset, alphas)``."""
    out = Path(out_dir)
    ids = dataset["cocoid"]
    for s, (bags, alpha) in sorted(curated.items()):
        write_bags_parquet(out / f"bags_{s}" / "test-00000-of-00001.parquet", dataset, bags, alpha,
                           embed_images=embed_images, captions_column=captions_column, progress=progress)
        write_json_atomic(out / f"{s}.json", [[int(ids[r]) for r in b] for b in bags])
        write_json_atomic(out / f"alpha_{s}.json", [float(a) for a in alpha])
    write_json_atomic(out / "mining_info.json", info, indent=2)
    (out / "README.md.tmp").write_text(render_card(info), encoding="utf-8")
    os.replace(out / "README.md.tmp", out / "README.md")
    return out


def read_authors_bags(path: str | os.PathLike) -> list[list[int]]:
    """Read an authors'-format bag file (``{s}.json``: list of bags, each a list of COCO ids)."""
    with open(path, encoding="utf-8") as f:
        bags = json.load(f)
    if not isinstance(bags, list) or not all(isinstance(b, list) and all(isinstance(c, int) for c in b) for b in bags):
        raise ValueError(f"{path}: expected a JSON list of bags, each a list of integer COCO ids")
    for k, bag in enumerate(bags):
        check_distinct_bag(bag, f"{path}: bag {k}")
    return bags


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _load_rows_and_embeddings(args, out: Path):
    from datasets_scripts.coco import concat_splits, load_coco

    dataset = concat_splits(load_coco(args.dataset), args.split)
    if args.embeddings:
        m = torch.from_numpy(np.load(args.embeddings))
        if m.shape[0] != len(dataset):
            raise ValueError(f"{args.embeddings} has {m.shape[0]} rows but split {args.split!r} has {len(dataset)}")
        return dataset, m, f"precomputed:{Path(args.embeddings).name}"
    from metrics.clip_judge import ClipJudge

    judge = ClipJudge.from_pretrained(args.judge, device=args.device, batch_size=args.batch_size)
    cache = Path(args.cache_dir) if args.cache_dir else out / ".cache"
    m = multimodal_embeddings(dataset, judge, cache_dir=cache, chunk_size=args.embed_chunk,
                              captions_column=args.captions_column)
    return dataset, m, judge.name


def _cmd_build(args) -> int:
    out = Path(args.out)
    if (out / "README.md").exists():
        if not (out / "mining_info.json").exists():
            raise FileExistsError(f"{out} holds a README.md but is not a TrueMatch folder; choose another --out")
        if not args.overwrite:
            raise FileExistsError(f"{out} already holds a TrueMatch folder; pass --overwrite or choose another --out")
        for old in [*out.glob("bags_*"), *out.glob("*.json"), out / "README.md"]:  # keep the embedding cache
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    sizes = sorted(set(args.sizes))
    dataset, m, judge_name = _load_rows_and_embeddings(args, out)
    t0 = time.time()
    sims, idx = knn(m, max(sizes) - 1, device=args.device, progress=True)
    curated, info_c, info_k = {}, {}, {}
    for s in sizes:
        bags, alpha = bags_from_knn(sims, idx, s)
        kept, pos = curate(bags, alpha, return_indices=True)
        a = alpha[pos].tolist()
        keep = [j for j in range(len(kept)) if args.min_alpha is None or a[j] >= args.min_alpha]
        keep = keep[: args.max_bags] if args.max_bags is not None else keep
        curated[s] = ([kept[j] for j in keep], [a[j] for j in keep])
        info_c[str(s)], info_k[str(s)] = len(bags), len(keep)
        print(f"bags of {s}: {len(bags)} candidates -> {len(kept)} curated -> {len(keep)} kept"
              + (f" (alpha {a[keep[0]]:.4f} .. {a[keep[-1]]:.4f})" if keep else ""))
    info = {"judge": judge_name, "dataset": str(args.dataset), "split": args.split, "n_images": len(dataset),
            "captions_column": args.captions_column,
            "sizes": sizes, "candidates": info_c, "curated": info_k, "min_alpha": args.min_alpha,
            "max_bags": args.max_bags, "mining_seconds": round(time.time() - t0, 2), "review": None}
    write_truematch(out, dataset, curated, info, embed_images=not args.no_embed_images,
                    captions_column=args.captions_column)
    print(f"wrote {out}")
    return 0


def _cmd_training_bags(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset, m, judge_name = _load_rows_and_embeddings(args, out)
    _, idx = knn(m, min(args.top_k, len(dataset) - 1), device=args.device, progress=True)
    ids = dataset["cocoid"]
    for s in sorted(set(args.sizes)):
        bags, stats = training_bags_from_knn(idx, s, seed=args.seed, leftover=args.leftover, return_stats=True)
        path = out / f"train_bags_{s}.json"
        write_json_atomic(path, {"bag_size": s, "cocoids": [[int(ids[r]) for r in b] for b in bags],
                                  "split": args.split, "judge": judge_name, **stats})
        print(f"{path}: {stats['n_hard_bags']} hard + {stats['n_random_bags']} random bags; "
              f"{stats['n_unplaced']} images could not be placed in a hard bag, {stats['n_dropped']} sit out")
    return 0


TRUEMATCH_SIZES = [3, 5, 7]  # the paper's TrueMatch bag sizes (Sec. 3.1)
# BagCurri's sizes (App. B.3, Table 10): the authors' egg/zoo/emergent_captioner/finetuning/configs/sr.yml
# (commit 3db9c82), neg_mining.curricullum {3: 2, 8: 3, 10: 5, 12: 7, 14: 10, 17: 15, 20: 20}
TRAINING_SIZES = [2, 3, 5, 7, 10, 15, 20]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m datasets_scripts.truematch``."""
    p = argparse.ArgumentParser(prog="python -m datasets_scripts.truematch",
                                description="Mine TrueMatch bags (NDLB Alg. 1 + 2) and SR training bags (App. B.2).")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, split: str, sizes: list[int]):
        sp.add_argument("--dataset", required=True, help="COCO dataset folder (datasets_scripts.coco) or Hub id")
        sp.add_argument("--split", default=split, help=f"split(s) to mine, '+'-joined in this order (default {split})")
        sp.add_argument("--judge", default="openai/clip-vit-base-patch32",
                        help="CLIP judge: Hub id or folder (ClipJudge.from_pretrained)")
        sp.add_argument("--captions-column", default="captions",
                        help="list-of-captions column to embed (e.g. HolisticCap captions, as the paper)")
        sp.add_argument("--embeddings", help="precomputed (N, D) .npy multimodal embeddings instead of --judge")
        sp.add_argument("--sizes", type=int, nargs="+", default=list(sizes),
                        help=f"bag sizes (default {' '.join(map(str, sizes))})")
        sp.add_argument("--out", required=True, help="output folder")
        sp.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available for the judge, "
                        "cpu for the search)")
        sp.add_argument("--batch-size", type=int, default=64, help="judge batch size")
        sp.add_argument("--embed-chunk", type=int, default=512, help="rows per cached embedding chunk")
        sp.add_argument("--cache-dir", help="embedding cache (default OUT/.cache); reruns reuse finished chunks")

    b = sub.add_parser("build", help="TrueMatch folder: curated bags per size (parquet + card + {s}.json)")
    common(b, "test+val", TRUEMATCH_SIZES)
    b.add_argument("--min-alpha", type=float, default=None, help="keep only curated bags with alpha >= this")
    b.add_argument("--max-bags", type=int, default=None, help="keep at most this many curated bags per size")
    b.add_argument("--no-embed-images", action="store_true", help="store image paths instead of bytes")
    b.add_argument("--overwrite", action="store_true", help="replace an existing TrueMatch folder")
    b.set_defaults(func=_cmd_build)

    t = sub.add_parser("training-bags", help="disjoint hard training bags (a training-bag file per size)")
    common(t, "train", TRAINING_SIZES)
    t.add_argument("--top-k", type=int, default=200, help="neighbours considered per query (paper: 200)")
    t.add_argument("--seed", type=int, default=0, help="query order (use one seed per epoch)")
    t.add_argument("--leftover", choices=["random", "drop"], default="random",
                   help="images not placed in a hard bag: random bags (default) or sit out the epoch")
    t.set_defaults(func=_cmd_training_bags)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if min(args.sizes) < 2:
        p.error("bag sizes must be >= 2")
    try:
        return args.func(args)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


__all__ = ["bag_features", "bags_from_knn", "build_parser", "candidate_bags", "curate", "knn",
           "knn_reference", "lo_bits", "main", "multimodal_embeddings", "read_authors_bags", "render_card",
           "search_error_bound", "split_unit_rows", "training_bags", "training_bags_from_knn",
           "write_bags_parquet", "write_json_atomic", "write_truematch"]

if __name__ == "__main__":
    sys.exit(main())
