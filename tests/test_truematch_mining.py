"""TrueMatch mining (datasets_scripts/truematch.py): Alg. 1 and 2 on hand-checked examples and
against an independent float64 reference on embeddings with near-ties, reproducibility across
block sizes and thread counts, App. B.2 training bags, multimodal embeddings with a tiny judge,
and the build / training-bags CLI on generated COCO data."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasets_scripts import truematch as tm
from datasets_scripts.coco import main as coco_main
from tests.test_coco import make_coco

S2, S3, S6 = 1 / math.sqrt(2), 1 / math.sqrt(3), 1 / math.sqrt(6)

# Rows whose pairwise cosines are known in closed form, with exact ties by symmetry
# (r1 and r2 are coordinate permutations of each other w.r.t. r0 and r4).
HAND = torch.tensor([
    [1., 0, 0, 0],  # r0
    [1., 1, 0, 0],  # r1: cos(r0)=1/sqrt2
    [1., 0, 1, 0],  # r2: cos(r0)=1/sqrt2 (tie with r1), cos(r1)=1/2
    [0., 0, 0, 1],  # r3: cos 0 with r0, r1, r2, r4 (a four-way tie)
    [1., 1, 1, 0],  # r4: cos(r0)=1/sqrt3, cos(r1)=cos(r2)=2/sqrt6
    [0., 0, 1, 1],  # r5: cos(r3)=1/sqrt2, cos(r2)=1/2, cos(r4)=1/sqrt6
])


def test_alg1_hand_checked_with_ties():
    bags, alpha = tm.candidate_bags(HAND, 3)
    # query first, neighbours by descending cosine, ties by lower index
    assert bags.tolist() == [[0, 1, 2], [1, 4, 0], [2, 4, 0], [3, 5, 0], [4, 1, 2], [5, 3, 2]]
    expected = [S2, (2 * S6 + S2) / 2, (2 * S6 + S2) / 2, S2 / 2, 2 * S6, (S2 + 0.5) / 2]
    assert alpha.dtype == torch.float64
    assert alpha.tolist() == pytest.approx(expected, abs=1e-12)
    assert alpha[1] == alpha[2]  # exact tie survives the computation
    bags2, _ = tm.candidate_bags(HAND, 2)
    assert bags2.tolist() == [[0, 1], [1, 4], [2, 4], [3, 5], [4, 1], [5, 3]]


def test_alg2_hand_checked_overlaps_and_ties():
    bags, alpha = tm.candidate_bags(HAND, 3)
    # visiting order: r4 (.82), r1 = r2 (.76, stable: r1 first), r0 (.71), r5 (.60), r3 (.35);
    # r1, r2, r0, r5 overlap {4, 1, 2}; r3's bag [3, 5, 0] is disjoint
    assert tm.curate(bags, alpha) == [[4, 1, 2], [3, 5, 0]]
    kept, pos = tm.curate(bags, alpha, return_indices=True)
    assert pos == [4, 3]
    # explicit lists: equal alphas keep input order; overlapping bags are skipped
    b = [[0, 1], [2, 3], [1, 2], [4, 5], [5, 6]]
    a = [0.5, 0.9, 0.9, 0.5, 0.7]
    assert tm.curate(b, a) == [[2, 3], [5, 6], [0, 1]]
    with pytest.raises(ValueError, match="NaN"):
        tm.curate(b, [0.5, float("nan"), 0, 0, 0])


def near_tie_embeddings(n: int = 400, d: int = 32, seed: int = 0) -> np.ndarray:
    """float64 embeddings with exact ties and near-ties far below float32 resolution:

    - exact ties: copies of a row (5, 50-57; 9, 200-229: wider than any candidate list), a row
      and its multiples by 4 (2, 100-102), and an antipodal pair (250, 251);
    - clusters of near-copies (7, 120-149 at 3e-4; 11, 300-329 at 1e-3): each other's nearest
      neighbours with cosines 1 - O(1e-7) that differ by ~1e-11;
    - two ladders (rows 361-372 for query 360, 376-387 for query 375): 12 rows at the same
      angle to the query, pushed along it by (i + 1) * ~1e-10, so that their cosines to the
      query differ by ~1e-11 and increase with the index (an index tie-break of equal float32
      values would give the reverse order).
    """
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, d))
    m[50:58] = m[5]
    m[100:103] = m[2] * 4.0
    m[200:230] = m[9]
    m[250] = -m[251]
    m[120:150] = m[7] + 3e-4 * rng.standard_normal((30, d))
    m[300:330] = m[11] + 1e-3 * rng.standard_normal((30, d))
    for q, step, off in ((360, 1e-10, 0.3), (375, 1.3e-10, 0.35)):  # two different geometries
        qh = m[q] / np.linalg.norm(m[q])
        for i in range(12):
            v = rng.standard_normal(d)
            v -= (v @ qh) * qh
            m[q + 1 + i] = (1.0 + (i + 1) * step) * qh + off * v / np.linalg.norm(v)
    return m


def reference_cosines(m: np.ndarray) -> np.ndarray:
    """Alg. 1 l.9, independently: the full float64 cosine matrix, pair by pair, each entry the
    correctly rounded sum (math.fsum) of the products of the unit rows x = m / |m|."""
    x = m / np.sqrt([math.fsum(row * row) for row in m])[:, None]
    n = len(x)
    cos = np.empty((n, n))
    for r in range(n):
        cos[r, r:] = [math.fsum(p) for p in x[r] * x[r:]]
        cos[r:, r] = cos[r, r:]
    return cos


def reference_orders(cos: np.ndarray) -> list[list[int]]:
    """Each row's other rows by cosine descending, ties by the lower index."""
    n = len(cos)
    return [sorted((j for j in range(n) if j != r), key=lambda j: (-cos[r, j], j)) for r in range(n)]


def reference_alg1(cos: np.ndarray, orders: list[list[int]], s: int) -> tuple[list[list[int]], list[float]]:
    """Algorithm 1 l.12-16: bag r = [r, its s-1 most similar rows], alpha_r = their mean cosine to r."""
    bags = [[r, *orders[r][: s - 1]] for r in range(len(cos))]
    return bags, [math.fsum(cos[b[0], b[1:]]) / (s - 1) for b in bags]


def reference_alg2(bags: list[list[int]], alpha: list[float]) -> list[int]:
    """Algorithm 2: visit bags by alpha descending (Python's sort is stable: equal alphas keep their
    order) and keep a bag when none of its images is in a kept one. Returns kept positions."""
    seen: set[int] = set()
    kept = []
    for r in sorted(range(len(bags)), key=lambda r: -alpha[r]):
        if not seen & set(bags[r]):
            seen |= set(bags[r])
            kept.append(r)
    return kept


@pytest.fixture(scope="module")
def near_ties():
    m = near_tie_embeddings()
    cos = reference_cosines(m)
    orders = reference_orders(cos)
    # the data is what it claims: distinct cosines near the top are resolvable in float64 (gaps
    # >= 1e-12, far above the ~1e-14 error of either computation) ...
    for r in range(len(m)):
        gaps = -np.diff(cos[r, orders[r][:41]])
        assert gaps.min() >= 0 and (gaps[gaps > 0].min() if (gaps > 0).any() else 1) > 1e-12, r
    # ... but not in float32: ranking float32 cosines (a stable sort) gets many rows wrong
    x32 = (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
    s32 = x32 @ x32.T
    np.fill_diagonal(s32, -np.inf)
    o32 = np.argsort(-s32, axis=1, kind="stable")[:, :20]
    assert sum(o32[r].tolist() != orders[r][:20] for r in range(len(m))) > 40
    return m, cos, orders


@pytest.mark.parametrize("k", [1, 4, 8, 19, 40])
def test_knn_equals_float64_reference_on_near_ties(near_ties, k):
    m, cos, orders = near_ties
    ref_i = torch.tensor([o[:k] for o in orders])
    ref_v = torch.tensor(np.take_along_axis(cos, ref_i.numpy(), 1))
    first = None
    for block in (7, 64, 150, 400):  # blocks smaller and larger than k, uneven last block
        v, i = tm.knn(m, k, block_size=block)
        assert torch.equal(i, ref_i), (block, (i != ref_i).any(1).nonzero().flatten()[:10].tolist())
        assert (v - ref_v).abs().max() < 1e-13, block
        if first is None:
            first = (v, i)
        assert torch.equal(v, first[0]) and torch.equal(i, first[1])  # the same bits
    # the ladders come out in the reverse index order, the duplicate groups by index
    _, i = tm.knn(m, 12)
    assert i[360].tolist() == list(range(372, 360, -1)) and i[375].tolist() == list(range(387, 375, -1))
    assert i[5, :8].tolist() == list(range(50, 58)) and i[215, :3].tolist() == [9, 200, 201]


@pytest.mark.parametrize("s", [2, 3, 5, 7, 10, 20])
def test_bags_and_alpha_equal_float64_reference_alg1_alg2(near_ties, s):
    m, cos, orders = near_ties
    ref_bags, ref_alpha = reference_alg1(cos, orders, s)
    bags, alpha = tm.candidate_bags(m, s, block_size=53)
    assert bags.tolist() == ref_bags
    assert np.abs(alpha.numpy() - np.array(ref_alpha)).max() < 1e-9
    assert np.abs(alpha.numpy() - np.array(ref_alpha)).max() < 1e-13  # in fact to float64 rounding
    kept, pos = tm.curate(bags, alpha, return_indices=True)
    assert pos == reference_alg2(ref_bags, alpha.tolist())  # Alg. 2 itself, on the same alphas
    # with the reference's own alphas: the same bags in the same order, except that bags whose
    # alphas are equal in exact arithmetic but not after float64 rounding (the copies' cosine of
    # 1, ~1e-16 apart) may come in another order
    ref_kept = reference_alg2(ref_bags, ref_alpha)
    assert sorted(pos) == sorted(ref_kept)
    a_ref = np.array(ref_alpha)
    assert (np.diff(a_ref[pos]) <= 1e-15).all() and (a_ref[pos] != a_ref[ref_kept]).sum() <= 4
    assert np.abs(a_ref[pos] - a_ref[ref_kept]).max() < 1e-15


def test_float32_input_and_exact_reranking(near_ties):
    m, _, _ = near_ties
    d = m.shape[1]
    hl = tm.split_unit_rows(m)
    hi, lo, b = hl[:, :d].double(), hl[:, d:].double(), tm.lo_bits(d)
    H, L = hi * 2.0**24, lo * 2.0 ** (24 + b)  # integers
    assert torch.equal(H, H.round()) and torch.equal(L, L.round()) and H.abs().max() <= 2**24
    x = torch.from_numpy(m / np.linalg.norm(m, axis=1, keepdims=True))
    assert (hi + lo - x).abs().max() <= 2.0 ** -(25 + b) + 1e-16
    # every returned cosine is fl(hi.hi' + (hi.lo' + lo.hi')) with both dot products exact:
    # recomputed here with Python integers
    sims, idx = tm.knn(m, 6)
    Hi, Li = H.long().tolist(), L.long().tolist()
    for r in (0, 7, 120, 215, 360):
        for c, j in enumerate(idx[r].tolist()):
            s1 = sum(p * q for p, q in zip(Hi[r], Hi[j]))
            s2 = sum(p * q for p, q in zip(Hi[r], Li[j])) + sum(p * q for p, q in zip(Li[r], Hi[j]))
            assert sims[r, c].item() == s1 * 2.0**-48 + s2 * 2.0 ** -(48 + b), (r, j)
    # float32 embeddings (as CLIP gives) are mined on their exact float64 values
    m32 = torch.from_numpy(m).float()
    v1, i1 = tm.knn(m32, 8)
    v2, i2 = tm.knn(m32.double(), 8)
    assert torch.equal(v1, v2) and torch.equal(i1, i2)


def _clustered(n: int, d: int, seed: int) -> torch.Tensor:
    """Clustered embeddings with duplicates (exact ties) and near-copies."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n // 50, d, generator=g)
    m = centres[torch.randint(0, len(centres), (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    m[10:20] = m[3]
    m[40:80] = m[30] + 1e-3 * torch.randn(40, d, generator=g)
    return m.double()


def test_identical_across_block_sizes_and_thread_counts():
    m = _clustered(1500, 384, seed=0)  # large enough for multithreaded matmul, topk and re-ranking
    k = 120
    prev = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for block in (97, 1500):
                out[threads, block] = tm.knn(m, k, block_size=block)
    finally:
        torch.set_num_threads(prev)
    (v0, i0), *rest = out.values()
    for key, (v, i) in out.items():
        assert torch.equal(v, v0) and torch.equal(i, i0), key
    ref_v, ref_i = tm.knn_reference(m, k)  # float64 matmul of the unit rows + a stable sort
    assert torch.equal(i0, ref_i) and (v0 - ref_v).abs().max() < 1e-12
    a0 = tm.bags_from_knn(v0, i0, 10)[1]
    assert torch.equal(a0, tm.candidate_bags(m, 10, block_size=311)[1])


def test_search_error_bound():
    m = _clustered(600, 256, seed=1)
    d = m.shape[1]
    hl = tm.split_unit_rows(m)
    s32 = (hl[:, :d] @ hl[:, :d].T).double()  # the float32 search similarities
    sims, idx = tm.knn(m, 30)
    err = (s32.gather(1, idx) - sims).abs().max().item()
    assert 0 < err <= tm.search_error_bound(d)
    assert tm.search_error_bound(1024) == pytest.approx(1024 * 2.0**-24, rel=0.05)


def test_knn_errors_and_memory_budget():
    with pytest.raises(ValueError, match="k must be"):
        tm.knn(torch.randn(5, 3), 5)
    m = torch.randn(6, 3)
    m[4] = 0
    with pytest.raises(ValueError, match=r"rows \[4\]"):
        tm.knn(m, 2)
    m[4] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[4\]"):
        tm.knn(m, 2)
    with pytest.raises(ValueError, match="non-empty"):
        tm.knn(torch.randn(4), 2)
    assert tm.auto_block_size(118_287, 512 * 2**20) == 1134  # a (1134, 118287) float32 block < 512 MiB
    assert tm.auto_block_size(300, 4 * 300 * 50) == 50
    # budget-derived blocks give the same answer
    x = random_with_ties(300, 16, seed=3)
    assert torch.equal(tm.knn(x, 6, max_block_bytes=4 * 300 * 50)[1], tm.knn(x, 6)[1])


def random_with_ties(n: int = 400, d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, d, generator=g)
    m[50:58] = m[5]          # a group of 9 identical rows: ties across every cut k < 8
    m[100:103] = m[2] * 4.0  # same direction, other norm (x4 is exact in floating point)
    m[200:230] = m[9]        # 31 identical rows
    m[250] = -m[251]
    return m


def test_training_bags_disjoint_unique_and_from_top_k():
    m = random_with_ties(401, 24, seed=1)
    top_k = 20
    _, nn = tm.knn(m, top_k)
    for s in (2, 3, 5):
        bags, st = tm.training_bags(m, s, top_k=top_k, seed=7, return_stats=True)
        flat = [r for b in bags for r in b]
        assert all(len(b) == s for b in bags)
        assert len(flat) == len(set(flat))  # each image at most once: disjoint and unique bags
        assert st["n_hard_bags"] + st["n_random_bags"] == len(bags)
        assert len(flat) + st["n_dropped"] == 401 and st["n_dropped"] < s
        assert st["n_unplaced"] == st["n_random_bags"] * s + st["n_dropped"]
        for b in bags[: st["n_hard_bags"]]:  # hard bags: neighbours from the query's top-k, nearest first
            row = nn[b[0]].tolist()
            assert set(b[1:]) <= set(row)
            assert [row.index(x) for x in b[1:]] == sorted(row.index(x) for x in b[1:])
        drop, st2 = tm.training_bags(m, s, top_k=top_k, seed=7, leftover="drop", return_stats=True)
        assert drop == bags[: st["n_hard_bags"]] and st2["n_dropped"] == st["n_unplaced"]
    # the seed sets the query order: same seed, same bags; another seed, other bags
    assert tm.training_bags(m, 3, top_k=top_k, seed=7) == tm.training_bags(m, 3, top_k=top_k, seed=7)
    assert tm.training_bags(m, 3, top_k=top_k, seed=8) != tm.training_bags(m, 3, top_k=top_k, seed=7)


def test_training_bags_two_clusters():
    # two tight clusters of three: whatever the query order, the bags are the clusters
    m = torch.tensor([[1, 0.01, 0], [1, 0.02, 0], [1, 0, 0.01], [0, 1, 0.01], [0, 1, 0.02], [0.01, 1, 0]])
    for seed in range(5):
        bags, st = tm.training_bags(m, 3, top_k=2, seed=seed, return_stats=True)
        assert sorted(sorted(b) for b in bags) == [[0, 1, 2], [3, 4, 5]] and st["n_unplaced"] == 0


class CountingJudge:
    """Wraps a ClipJudge and counts calls (to check the on-disk cache)."""

    def __init__(self, judge):
        self.judge, self.name, self.calls = judge, judge.name, 0

    def embed_images(self, images, **kw):
        self.calls += 1
        return self.judge.embed_images(images, **kw)

    def embed_texts(self, texts, **kw):
        return self.judge.embed_texts(texts, **kw)


def test_multimodal_embeddings_and_cache(tmp_path, tiny_clip_judge_dir):
    from metrics.clip_judge import ClipJudge
    from tests.tiny import random_images

    judge = ClipJudge.from_pretrained(str(tiny_clip_judge_dir), device="cpu")
    images = random_images(7, size=32, seed=2)
    caps = [[f"a red circle {i}", "two blue squares", ""][: 1 + i % 3] for i in range(7)]
    ds = datasets.Dataset.from_dict({"cocoid": list(range(7)), "image": images, "captions": caps},
                                    features=datasets.Features({"cocoid": datasets.Value("int64"),
                                                                "image": datasets.Image(),
                                                                "captions": datasets.List(datasets.Value("string"))}))
    m = tm.multimodal_embeddings(ds, judge, chunk_size=3, progress=False)
    d = judge.embed_dim
    assert m.shape == (7, 2 * d)
    z = judge.embed_images(images)
    t = torch.stack([F.normalize(judge.embed_texts(c).mean(0), dim=0) for c in caps])
    torch.testing.assert_close(m, torch.cat([z, t], dim=1), atol=1e-5, rtol=1e-5)

    counting = CountingJudge(judge)
    m1 = tm.multimodal_embeddings(ds, counting, cache_dir=tmp_path, chunk_size=3, progress=False)
    assert counting.calls == 3 and torch.equal(m1, m)  # chunks of 3, 3, 1 rows
    m2 = tm.multimodal_embeddings(ds, counting, cache_dir=tmp_path, chunk_size=3, progress=False)
    assert counting.calls == 3 and torch.equal(m2, m)  # all chunks reused
    (chunk,) = list(tmp_path.glob("mm-*/chunk-00001.npy"))
    chunk.unlink()  # an interrupted run: only the missing chunk is recomputed
    m3 = tm.multimodal_embeddings(ds, counting, cache_dir=tmp_path, chunk_size=3, progress=False)
    assert counting.calls == 4 and torch.equal(m3, m)
    assert not list(tmp_path.rglob("*.tmp"))
    # other captions -> another cache key, nothing stale reused
    ds2 = ds.map(lambda r: {"captions": [c + "!" for c in r["captions"]]})
    tm.multimodal_embeddings(ds2, counting, cache_dir=tmp_path, chunk_size=3, progress=False)
    assert counting.calls == 7


def test_build_and_training_bags_cli(tmp_path, tiny_clip_judge_dir):
    from metrics.clip_judge import ClipJudge

    images, kjson, _ = make_coco(tmp_path, n=24, missing=False, corrupt=False)
    coco = tmp_path / "coco"
    assert coco_main(["--images", str(images), "--karpathy", str(kjson), "--out", str(coco)]) == 0
    out = tmp_path / "truematch"
    args = ["build", "--dataset", str(coco), "--judge", str(tiny_clip_judge_dir), "--device", "cpu",
            "--sizes", "3", "5", "--out", str(out), "--embed-chunk", "5"]
    assert tm.main(args) == 0
    assert tm.main(args) == 2  # refuses to overwrite without --overwrite

    # independent recomputation of the expected bags
    from datasets_scripts.coco import concat_splits, load_coco

    rows = concat_splits(load_coco(coco, cache_dir=str(tmp_path / "c0")), "test+val")
    judge = ClipJudge.from_pretrained(str(tiny_clip_judge_dir), device="cpu")
    m = tm.multimodal_embeddings(rows, judge, progress=False)
    info = json.loads((out / "mining_info.json").read_text())
    assert info["n_images"] == 12 and info["candidates"] == {"3": 12, "5": 12}
    for s in (3, 5):
        bags, alpha = tm.candidate_bags(m, s)
        kept, pos = tm.curate(bags, alpha, return_indices=True)
        ids = rows["cocoid"]
        expected = [[ids[r] for r in b] for b in kept]
        assert json.loads((out / f"{s}.json").read_text()) == expected  # authors' format
        alphas = json.loads((out / f"alpha_{s}.json").read_text())
        assert alphas == pytest.approx(alpha[pos].tolist(), abs=1e-6)
        loaded = datasets.load_dataset(str(out), f"bags_{s}", cache_dir=str(tmp_path / f"c{s}"))["test"]
        assert loaded.column_names == ["bag_id", "cocoids", "images", "captions", "alpha"]
        assert loaded["cocoids"] == expected and loaded["bag_id"] == list(range(len(expected)))
        assert loaded["alpha"] == sorted(loaded["alpha"], reverse=True)
        first = loaded[0]
        assert len(first["images"]) == s and first["images"][0].size == (24, 24)
        assert first["captions"][0][0] == f"caption 0 of image {expected[0][0]}."
    card = (out / "README.md").read_text()
    assert "config_name: bags_5" in card and "arXiv:2409.03025" in card and "CC BY 4.0" in card
    # --overwrite replaces the bags (stale sizes removed) and reuses the cached embeddings
    before = json.loads((out / "3.json").read_text())
    assert tm.main(args[:8] + ["3", "--out", str(out), "--embed-chunk", "5", "--overwrite"]) == 0
    assert not (out / "bags_5").exists() and not (out / "5.json").exists()
    assert json.loads((out / "3.json").read_text()) == before
    assert "config_name: bags_5" not in (out / "README.md").read_text()

    # training bags on the train split (train + restval = 12 images)
    tb = tmp_path / "train_bags"
    assert tm.main(["training-bags", "--dataset", str(coco), "--judge", str(tiny_clip_judge_dir), "--device", "cpu",
                    "--sizes", "3", "--top-k", "4", "--out", str(tb), "--cache-dir", str(tmp_path / "cache")]) == 0
    data = json.loads((tb / "train_bags_3.json").read_text())
    train_ids = set(load_coco(coco, cache_dir=str(tmp_path / "c9"))["train"]["cocoid"])
    flat = [c for b in data["cocoids"] for c in b]
    assert data["bag_size"] == 3 and len(flat) == len(set(flat)) and set(flat) <= train_ids
    assert len(flat) + data["n_dropped"] == 12


def test_cli_default_sizes():
    p = tm.build_parser()
    assert p.parse_args(["build", "--dataset", "d", "--out", "o"]).sizes == [3, 5, 7]
    # the authors' BagCurri sizes (finetuning/configs/sr.yml, commit 3db9c82)
    assert p.parse_args(["training-bags", "--dataset", "d", "--out", "o"]).sizes == [2, 3, 5, 7, 10, 15, 20]


def test_help(capsys):
    for sub in ("build", "training-bags"):
        with pytest.raises(SystemExit) as e:
            tm.main([sub, "--help"])
        assert e.value.code == 0 and "--sizes" in capsys.readouterr().out


def test_authors_bag_file_with_a_repeated_image_is_an_error(tmp_path):
    from datasets_scripts.truematch import read_authors_bags

    good, bad = tmp_path / "3.json", tmp_path / "3bad.json"
    good.write_text("[[1, 2, 3], [4, 5, 6]]")
    bad.write_text("[[1, 2, 3], [4, 5, 4]]")
    assert read_authors_bags(good) == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match=r"3bad.json: bag 1 holds image id\(s\) 4 more than once \(\[4, 5, 4\]\)"):
        read_authors_bags(bad)
