"""The evaluate modules truematch / self_retrieval / clip_score (and, for what all four share,
cider_d): they load from their folders (also in a fresh process outside the repo, offline), return
known values on crafted embeddings, agree with an independent computation on real (tiny-judge)
embeddings, and their docstring examples run; they are named after their folders, compose with
`evaluate.combine`, take `None` as a missing caption through `add` / `add_batch`, and each folder is
a Hub metric Space (app.py, requirements.txt)."""

import ast
import doctest
import importlib.metadata
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from metrics.clip_judge import ClipJudge, random_distractors
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("truematch", "self_retrieval", "clip_score")
ALL_MODULES = (*MODULES, "cider_d")
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
        for shared in ("clip_judge.py", "caption_metric.py"):  # the one core, vendored by symlink
            link = folder / shared
            assert link.is_symlink() and link.resolve() == (ROOT / "metrics" / shared).resolve()
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
    assert out["clipsc"] == pytest.approx((6 * 100 + 100 * max(cos20, 0) + 0) / 8, abs=1e-4)


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
    assert out["clipsc"] == pytest.approx(np.mean([100 * max(txt[i] @ img[i], 0) for i in range(8)]), abs=1e-3)


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
    assert out["clipsc"] == pytest.approx(100 * 7 / 8, abs=1e-4)
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
    assert out["clipsc"] == pytest.approx((100 + 100) / 3, abs=1e-4)


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
    assert a["per_bag"] == b["per_bag"] and a["clipsc"] == pytest.approx(b["clipsc"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# what the four modules share: names, evaluate.combine, missing captions, Hub Space files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODULES)
def test_module_is_named_after_its_folder(name):
    assert load(name).name == name
    link = ROOT / "metrics" / name / "caption_metric.py"
    assert link.is_symlink() and link.resolve() == (ROOT / "metrics" / "caption_metric.py").resolve()


def test_combine_cider_d_and_truematch(judge, text_emb, monkeypatch):
    monkeypatch.chdir(ROOT)
    preds = CAPTIONS[:3] + [None]
    refs = [[c, "a shape."] for c in CAPTIONS[:4]]
    args = dict(image_embeddings=text_emb[:4], bags=[[0, 1], [2, 3]], judge=judge)
    combined = evaluate.combine(["metrics/cider_d", "metrics/truematch"]).compute(
        predictions=preds, references=refs, **args)
    cider = load("cider_d").compute(predictions=preds, references=refs)
    tm = load("truematch").compute(predictions=preds, **args)
    shared = {"missing", "num_missing"}  # both return them: evaluate prefixes the module name
    assert set(cider) & set(tm) == shared
    expected = {**{k: v for k, v in cider.items() if k not in shared}, **{f"cider_d_{k}": cider[k] for k in shared},
                **{k: v for k, v in tm.items() if k not in shared}, **{f"truematch_{k}": tm[k] for k in shared}}
    assert combined == expected
    assert combined["truematch_missing"] == combined["cider_d_missing"] == [3]
    assert combined["recall_at_1"] == pytest.approx(3 / 4) and combined["cider"] > 0
    # a module alone ignores the other's arguments too
    assert load("cider_d").compute(predictions=preds, references=refs, **args) == cider
    assert load("truematch").compute(predictions=preds, references=refs, tokenize=False, **args) == tm


def test_add_batch_takes_none_as_a_missing_caption(judge, text_emb):
    """Through `add_batch` (each batch's first value is the one evaluate type-checks) and `add`,
    alone and combined, `None` gives what `compute(predictions=[..., None, ...])` gives."""
    preds = [CAPTIONS[0], None, None, CAPTIONS[3], CAPTIONS[4], None]
    refs = [[c] for c in CAPTIONS[:6]]
    args = dict(image_embeddings=text_emb[:6], bags=[[0, 1, 2], [3, 4, 5]], num_distractors=3, judge=judge)
    modules = {name: str(ROOT / "metrics" / name) for name in ALL_MODULES}
    combined = evaluate.combine(modules, force_prefix=True)
    combined.add_batch(predictions=preds[:1], references=refs[:1])
    combined.add_batch(predictions=preds[1:4], references=refs[1:4])  # starts with None
    for pred, ref in zip(preds[4:], refs[4:]):
        combined.add(prediction=pred, reference=ref)
    out = combined.compute(**args)
    for name in ALL_MODULES:
        extra = {"references": refs} if name == "cider_d" else {}
        direct = load(name).compute(predictions=preds, **extra, **args)
        assert {k[len(name) + 1:]: v for k, v in out.items() if k.startswith(name + "_")} == direct, name
        assert direct["missing"] == [1, 2, 5] and direct["num_missing"] == 3, name
    for name in MODULES:  # a missing caption is wrong and scores 0
        single = load(name)
        single.add_batch(predictions=[None, None])
        result = single.compute(image_embeddings=text_emb[:2], bags=[[0, 1]], num_distractors=1, judge=judge)
        score = "clip_score" if name == "clip_score" else "clipsc"  # Hessel's CLIPScore / the paper's ClipSc
        assert result["missing"] == [0, 1] and result[score] == 0.0
        assert result.get("recall_at_1", 0.0) == 0.0


def _imported_distributions(folder: Path) -> set[str]:
    """Distributions of the third-party libraries imported by the module's files (symlinks followed)."""
    names = set()
    for path in folder.glob("*.py"):
        if path.name == "app.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module.split(".")[0])
    names -= set(sys.stdlib_module_names) | {"__future__"}
    dists = importlib.metadata.packages_distributions()
    return {dists[n][0].lower().replace("_", "-") for n in names}


def _pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {name.lower().replace("_", "-"): version for name, version in
            (line.split("==") for line in lines if line)}


@pytest.mark.parametrize("name", ALL_MODULES)
def test_module_folder_is_a_hub_metric_space(name, monkeypatch):
    folder = ROOT / "metrics" / name
    card = (folder / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and "evaluate" in meta["tags"]
    # app.py: evaluate's widget on this folder's module, loaded from any working directory
    launched = []
    monkeypatch.setattr(evaluate.utils, "launch_gradio_widget", launched.append)
    monkeypatch.chdir(ROOT / "tests")
    runpy.run_path(str(folder / "app.py"), run_name="__main__")
    assert [m.name for m in launched] == [name]
    # requirements.txt: every library the module imports, pinned as the repository's requirements.txt
    pins, repo_pins = _pins(folder / "requirements.txt"), _pins(ROOT / "requirements.txt")
    imported = _imported_distributions(folder)
    assert {"evaluate", "datasets", "numpy"} <= imported
    assert imported <= set(pins), f"{name}/requirements.txt lacks {sorted(imported - set(pins))}"
    assert all(repo_pins.get(dist) == version for dist, version in pins.items()), pins
