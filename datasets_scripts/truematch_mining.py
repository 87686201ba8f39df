"""TrueMatch and training-bag mining on embeddings: NDLB paper Sec. 3.1 and App. B (Algorithms 1
and 2, B.2). Pure functions on tensors: no files, no models (the embeddings, the dataset folder and
the command line are in ``datasets_scripts.truematch``).

1. :func:`knn` (Alg. 1 l.9): the ``k`` most similar *other* images of every image by cosine on
   ``m`` (the rows are normalised first, so cos = (cos_image + cos_text) / 2), per block of rows:
   memory O(block * N + N * k), never the N x N matrix.
2. :func:`candidate_bags` (Alg. 1 l.12-16): bag r = [r, its s-1 nearest neighbours],
   ``alpha_r`` = mean cosine between ``m_r`` and the s-1 others.
3. :func:`curate` (Alg. 2): bags sorted by alpha (descending, stable), a bag is kept only if
   none of its images is in an already kept bag.
4. :func:`training_bags` (App. B.2): disjoint hard bags over the train split from each image's
   top-200 neighbours, every image at most once per epoch.

True cosines, reproducible. The search ranks by the float64 cosine of the unit rows (within
~d * 2^-50 of it, ~1e-12 for d = 1024), ties broken by the lower index, and gives the same bits
whatever the block size, BLAS, thread count or device: a float32 matmul finds each row's
candidates with a proven safety margin, then each row's candidates are re-ranked with dot
products that are exact in float64 (:func:`split_unit_rows`, :func:`knn`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_MAX_BLOCK_BYTES = 512 * 2**20


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
        m: (N, d) multimodal embeddings (``datasets_scripts.truematch.multimodal_embeddings``).
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


__all__ = ["DEFAULT_MAX_BLOCK_BYTES", "auto_block_size", "bags_from_knn", "candidate_bags", "curate", "knn",
           "knn_reference", "lo_bits", "search_error_bound", "split_unit_rows", "training_bags",
           "training_bags_from_knn"]
