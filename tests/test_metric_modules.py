"""The evaluate modules truematch / self_retrieval / clip_score: they load from their folders
(also in a fresh process outside the repo, offline), return known values on crafted embeddings,
agree with an independent computation on real (tiny-judge) embeddings, and their docstring
examples run."""

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from PIL import Image

from metrics.clip_judge import ClipJudge, random_distractors
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("truematch", "self_retrieval", "clip_score")
CAPTIONS = ["a red circle.", "two blue squares.", "a green star at the top.", "one yellow diamond.",
            "a large purple triangle.", "three orange circles on the right.", "a black star.", "a white square."]


@pytest.fixture(scope="module")
def judge(tiny_clip_judge_dir):
    return ClipJudge.from_pretrained(str(tiny_clip_judge_dir), device="cpu")


@pytest.fixture(scope="module")
def text_emb(judge):
    t = judge.embed_texts(CAPTIONS)
    off_diag = (t @ t.T)[~torch.eye(len(t), dtype=torch.bool)]
    assert off_diag.max() < 1 - 1e-4  # distinct captions, distinct embeddings (the tests rely on it)
    return t


def load(name):
    return evaluate.load(str(ROOT / "metrics" / name))


def test_modules_are_self_contained_folders():
    for name in MODULES:
        folder = ROOT / "metrics" / name
        assert (folder / f"{name}.py").is_file() and (folder / "README.md").is_file()
        link = folder / "clip_judge.py"  # the one core, vendored by symlink
        assert link.is_symlink() and link.resolve() == (ROOT / "metrics" / "clip_judge.py").resolve()
        card = (folder / "README.md").read_text()
        assert card.startswith("---\n") and "## How to use" in card


# ---------------------------------------------------------------------------------------------
# truematch
# ---------------------------------------------------------------------------------------------


def test_truematch_known_values(judge, text_emb):
    t = text_emb
    # bag A (3): images = captions 0, 1 and 0 again -> caption 0 ties (wrong), 1 right, 2 ties (wrong)
    # bag B (5): images = own captions 3..6 (right) and a random one for the missing caption 7
    img = torch.stack([t[0], t[1], t[0], t[3], t[4], t[5], t[6], torch.randn(16)])
    preds = CAPTIONS[:7] + [None]
    out = load("truematch").compute(predictions=preds, image_embeddings=img, bags=[[0, 1, 2], [3, 4, 5, 6, 7]],
                                    judge=judge, return_details=True)
    assert out["recall_at_1_bag_3"] == pytest.approx(1 / 3)
    assert out["recall_at_1_bag_5"] == pytest.approx(4 / 5)
    assert out["recall_at_1"] == pytest.approx(5 / 8)
    assert (out["num_bags_3"], out["num_bags_5"], out["num_captions"]) == (1, 1, 8)
    assert out["missing"] == [7] and out["num_missing"] == 1
    assert out["per_bag"][0] == {"bag": [0, 1, 2], "correct": [False, True, False]}
    cos20 = float(t[2] @ t[0])
    assert out["clip_score"] == pytest.approx((6 * 100 + 100 * max(cos20, 0) + 0) / 8, abs=1e-4)


def test_truematch_ids_and_errors(judge, text_emb):
    ids = [1000 + k for k in range(8)]
    img = text_emb.numpy()
    m = load("truematch")
    out = m.compute(predictions=CAPTIONS, image_embeddings=img, ids=ids, bags=[["1000", 1001, 1002], [1003, 1004]],
                    judge=judge)
    assert out["recall_at_1"] == 1.0 and out["num_bags_2"] == 1
    with pytest.raises(KeyError, match="9999"):
        m.compute(predictions=CAPTIONS, image_embeddings=img, ids=ids, bags=[[1000, 9999]], judge=judge)
    with pytest.raises(ValueError, match="same image twice"):
        m.compute(predictions=CAPTIONS, image_embeddings=img, bags=[[0, 0, 1]], judge=judge)


def test_truematch_matches_independent_computation_on_images(judge):
    images = tiny.random_images(8, seed=3)
    captions = [CAPTIONS[k] for k in [0, 1, 2, 3, 4, 5, 6, 7]]
    bags = [[0, 1, 2], [3, 4, 5, 6, 7], [1, 4, 6]]
    out = load("truematch").compute(predictions=captions, images=images, bags=bags, judge=judge)
    img = judge.embed_images(images).numpy().astype(np.float64)
    txt = judge.embed_texts(captions).numpy().astype(np.float64)
    expected = []
    for bag in bags:  # straightforward numpy reference: strictly the largest in its bag
        for i in bag:
            s = {j: float(txt[i] @ img[j]) for j in bag}
            expected.append(all(s[i] > s[j] for j in bag if j != i))
    assert out["recall_at_1"] == pytest.approx(np.mean(expected))
    assert out["recall_at_1_bag_3"] == pytest.approx(np.mean(expected[:3] + expected[8:]))
    assert out["clip_score"] == pytest.approx(np.mean([100 * max(txt[i] @ img[i], 0) for i in range(8)]), abs=1e-3)


# ---------------------------------------------------------------------------------------------
# self_retrieval
# ---------------------------------------------------------------------------------------------


def test_rd_known_values(judge, text_emb):
    captions = list(CAPTIONS)
    captions[5] = captions[2]  # a duplicate caption: image 5 ties with image 2 for both captions
    t = judge.embed_texts(captions)
    preds = captions[:7] + [None]  # caption 7 missing
    out = load("self_retrieval").compute(predictions=preds, image_embeddings=t, ids=list("abcdefgh"),
                                         num_distractors=3, seed=4, judge=judge, return_details=True)
    cand = random_distractors(8, 3, seed=4)
    expected = [True] * 8
    expected[2] = 5 not in cand[2, 1:]
    expected[5] = 2 not in cand[5, 1:]
    expected[7] = False
    assert out["correct"] == expected and out["candidates"] == cand.tolist()
    assert out["recall_at_1"] == pytest.approx(sum(expected) / 8)
    assert out["num_candidates"] == 4 and out["missing"] == ["h"]
    assert out["clip_score"] == pytest.approx(100 * 7 / 8, abs=1e-4)
    with pytest.raises(ValueError, match="at least 100 images"):
        load("self_retrieval").compute(predictions=preds, image_embeddings=t, judge=judge)  # RD100 on 8


def test_image_sets_known_values(judge, text_emb):
    t, r = text_emb, torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    sets = [torch.stack([r[0], t[1], r[1]]),  # target 1 = its own caption -> right
            torch.stack([t[2], t[2], r[2]]),  # target 0 ties with image 1 -> wrong
            torch.stack([t[3], r[0]])]        # caption missing -> wrong
    out = load("self_retrieval").compute(predictions=[CAPTIONS[1], CAPTIONS[2], None], image_sets=sets,
                                         targets=[1, 0, 0], groups=["video", "static", "video"], judge=judge)
    assert out["recall_at_1"] == pytest.approx(1 / 3)
    assert out["recall_at_1_video"] == pytest.approx(1 / 2) and out["recall_at_1_static"] == 0.0
    assert out["missing"] == [2] and out["num_candidates"] == 3
    assert out["clip_score"] == pytest.approx((100 + 100) / 3, abs=1e-4)


def test_load_imagecode_and_set_mode_on_files(judge, tmp_path):
    images = tiny.random_images(11, seed=5)
    for name, n in [("video-clip_1", 11), ("open-images-7_ab", 3)]:
        (tmp_path / "image-sets" / name).mkdir(parents=True)
        for i in range(n):
            images[i].save(tmp_path / "image-sets" / name / f"img{i}.jpg")
    data = {"video-clip_1": {"10": "the last frame", "2": "a frame"}, "open-images-7_ab": {"0": "a photo"}}
    (tmp_path / "valid_data.json").write_text(json.dumps(data))
    m = load("self_retrieval")
    load_imagecode = sys.modules[type(m).__module__].load_imagecode
    ic = load_imagecode(tmp_path / "valid_data.json", tmp_path / "image-sets")
    assert ic["ids"] == ["video-clip_1/img10", "video-clip_1/img2", "open-images-7_ab/img0"]
    assert ic["targets"] == [10, 2, 0] and ic["groups"] == ["video", "video", "static"]
    assert [Path(p).name for p in ic["image_sets"][0]] == [f"img{i}.jpg" for i in range(11)]  # numeric order
    assert ic["descriptions"][0] == "the last frame"
    out = m.compute(predictions=ic["descriptions"], image_sets=ic["image_sets"], targets=ic["targets"],
                    image_set_ids=ic["image_set_ids"], judge=judge, return_details=True)
    # independent: embed the frames of each set, strictly highest similarity
    expected = []
    for paths, target, text in zip(ic["image_sets"], ic["targets"], ic["descriptions"]):
        e = judge.embed_images(paths)
        s = (judge.embed_texts([text]) @ e.T)[0]
        expected.append(bool(all(s[target] > s[j] for j in range(len(paths)) if j != target)))
    assert out["correct"] == expected and out["num_candidates"] == 11
    with pytest.raises(FileNotFoundError, match="missing-set"):
        (tmp_path / "bad.json").write_text(json.dumps({"missing-set": {"0": "x"}}))
        load_imagecode(tmp_path / "bad.json", tmp_path / "image-sets")


# ---------------------------------------------------------------------------------------------
# clip_score
# ---------------------------------------------------------------------------------------------


def test_clip_score_known_values(judge):
    caps = CAPTIONS[:3]
    prompted = judge.embed_texts([f"A photo depicts {c}" for c in caps])
    m = load("clip_score")
    # image embedding == prompted caption embedding -> cos 1 -> CLIP-S = 2.5; reference == caption
    # -> text-text cos 1 -> RefCLIP-S = H-mean(2.5, 1) = 5 / 3.5; a missing caption scores 0
    out = m.compute(predictions=caps + [None], image_embeddings=torch.cat([prompted, -prompted[:1]]),
                    references=[[c] for c in caps] + [["anything"]], judge=judge, return_details=True)
    assert out["clip_scores"] == pytest.approx([2.5, 2.5, 2.5, 0.0], abs=1e-5)
    assert out["refclip_scores"] == pytest.approx([5 / 3.5] * 3 + [0.0], abs=1e-5)
    assert out["clip_score"] == pytest.approx(7.5 / 4, abs=1e-5) and out["missing"] == [3]
    # negative cosine is clipped to 0; no prompt with prompt=""
    plain = judge.embed_texts(caps)
    out = m.compute(predictions=caps, image_embeddings=torch.cat([plain[:2], -plain[2:]]), prompt="", judge=judge,
                    return_details=True)
    assert out["clip_scores"] == pytest.approx([2.5, 2.5, 0.0], abs=1e-5) and "refclip_score" not in out


def test_clip_score_matches_hessel_formula_on_images(judge):
    images, caps = tiny.random_images(3, seed=9), CAPTIONS[3:6]
    refs = [["a photo", "one yellow diamond"], ["purple"], ["three circles", "orange", "right"]]
    out = load("clip_score").compute(predictions=caps, images=images, references=refs, judge=judge,
                                     return_details=True)
    img = judge.embed_images(images).double()
    c = judge.embed_texts([f"A photo depicts {x}" for x in caps]).double()
    for k in range(3):
        clip = 2.5 * max(float(c[k] @ img[k]), 0)
        r = judge.embed_texts([f"A photo depicts {x}" for x in refs[k]]).double()
        ref = max(float((r @ c[k]).max()), 0)
        hm = 2 * clip * ref / (clip + ref) if clip + ref > 0 else 0.0
        assert out["clip_scores"][k] == pytest.approx(clip, abs=1e-5)
        assert out["refclip_scores"][k] == pytest.approx(hm, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# loading in a fresh process outside the repo, and the docstring examples
# ---------------------------------------------------------------------------------------------


def test_modules_load_offline_outside_the_repo(tiny_clip_judge_dir, text_emb, tmp_path):
    np.save(tmp_path / "img.npy", text_emb[:4].numpy())
    script = f"""
import json, numpy as np, evaluate
img = np.load("img.npy")
caps = {CAPTIONS[:4]!r}
judge = {str(tiny_clip_judge_dir)!r}
out = {{}}
out["truematch"] = evaluate.load({str(ROOT / "metrics" / "truematch")!r}).compute(
    predictions=caps, image_embeddings=img, bags=[[0, 1], [2, 3]], judge=judge, device="cpu")["recall_at_1"]
out["self_retrieval"] = evaluate.load({str(ROOT / "metrics" / "self_retrieval")!r}).compute(
    predictions=caps, image_embeddings=img, num_distractors=3, judge=judge, device="cpu")["recall_at_1"]
out["clip_score"] = evaluate.load({str(ROOT / "metrics" / "clip_score")!r}).compute(
    predictions=caps, image_embeddings=img, prompt="", judge=judge, device="cpu")["clip_score"]
import sys
out["repo_on_path"] = any("metrics" in m.split(".")[0] for m in sys.modules if m.startswith("metrics"))
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"truematch": 1.0, "self_retrieval": 1.0, "clip_score": pytest.approx(2.5, abs=1e-5),
                   "repo_on_path": False}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    module = sys.modules[type(load(name)).__module__]
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module) if t.examples]
    assert tests, f"{name} has no docstring examples"
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0 and result.attempted >= 5


def test_missing_predictions_first_position(judge, text_emb):
    """evaluate's own type check only looks at the first prediction: a leading None still works."""
    out = load("truematch").compute(predictions=[None] + CAPTIONS[1:4], image_embeddings=text_emb[:4],
                                    bags=[[0, 1], [2, 3]], judge=judge)
    assert out["missing"] == [0] and out["recall_at_1"] == pytest.approx(3 / 4)


def test_pil_images_and_paths_give_the_same_result(judge, tmp_path):
    images = [Image.new("RGB", (40, 40), c) for c in ["red", "blue", "green"]]
    paths = []
    for k, im in enumerate(images):
        im.save(tmp_path / f"{k}.png")
        paths.append(str(tmp_path / f"{k}.png"))
    m = load("truematch")
    a = m.compute(predictions=CAPTIONS[:3], images=images, bags=[[0, 1, 2]], judge=judge, return_details=True)
    b = m.compute(predictions=CAPTIONS[:3], images=paths, bags=[[0, 1, 2]], judge=judge, return_details=True)
    assert a["per_bag"] == b["per_bag"] and a["clip_score"] == pytest.approx(b["clip_score"], abs=1e-4)
