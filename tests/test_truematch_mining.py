"""TrueMatch mining (datasets_scripts/truematch.py): Alg. 1 and 2 on hand-checked examples, chunked
search vs full-matrix and exact-integer references, App. B.2 training bags, multimodal embeddings
with a tiny judge, and the build / training-bags CLI on generated COCO data."""

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
    assert alpha.tolist() == pytest.approx(expected, abs=1e-3)
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


def _int_reference(m: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: exact int64 dot products of the codes, np.lexsort per row."""
    codes, scale = tm.integer_codes(m)
    c = codes.numpy().astype(np.int64)
    sim = c @ c.T
    n = len(c)
    idx = np.empty((n, k), dtype=np.int64)
    for r in range(n):
        others = np.array([j for j in range(n) if j != r])
        order = np.lexsort((others, -sim[r, others]))  # by -sim, then by index
        idx[r] = others[order[:k]]
    vals = np.take_along_axis(sim, idx, 1) / scale**2
    return vals, idx


def random_with_ties(n: int = 400, d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, d, generator=g)
    m[50:58] = m[5]          # a group of 9 identical rows: ties across every cut k < 8
    m[100:103] = m[2] * 4.0  # same direction, other norm (x4 is exact in floating point)
    m[200:230] = m[9]        # 31 identical rows
    m[250] = -m[251]
    return m


@pytest.mark.parametrize("k", [1, 4, 8, 40])
def test_chunked_knn_equals_full_matrix(k):
    m = random_with_ties()
    ref_v, ref_i = tm.knn_reference(m, k)
    int_v, int_i = _int_reference(m, k)
    assert np.array_equal(ref_i.numpy(), int_i) and np.array_equal(ref_v.numpy(), int_v)
    for block in (7, 64, 150, 400):  # blocks smaller and larger than k, uneven last block
        v, i = tm.knn(m, k, block_size=block)
        assert torch.equal(i, ref_i), block
        assert torch.equal(v, ref_v), block
    # the duplicated rows' neighbours are their twins, lowest indices first
    _, i = tm.knn(m, 8, block_size=33)
    assert i[5].tolist() == list(range(50, 58))
    assert i[50].tolist() == [5, *range(51, 58)]
    assert i[215, :3].tolist() == [9, 200, 201]


def test_knn_errors_and_memory_budget():
    with pytest.raises(ValueError, match="k must be"):
        tm.knn(torch.randn(5, 3), 5)
    m = torch.randn(6, 3)
    m[4] = 0
    with pytest.raises(ValueError, match=r"rows \[4\]"):
        tm.knn(m, 2)
    assert tm.auto_block_size(118_287, 512 * 2**20) == 8192  # 2 x 8192^2 float32 = 512 MiB
    # budget-derived blocks give the same answer
    x = random_with_ties(300, 16, seed=3)
    assert tm.auto_block_size(300, 8 * 50**2) == 50
    assert torch.equal(tm.knn(x, 6, max_block_bytes=8 * 50**2)[1], tm.knn_reference(x, 6)[1])


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


def test_help(capsys):
    for sub in ("build", "training-bags"):
        with pytest.raises(SystemExit) as e:
            tm.main([sub, "--help"])
        assert e.value.code == 0 and "--sizes" in capsys.readouterr().out
