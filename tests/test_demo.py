"""The offline synthetic world (demo/): the world itself, the judges' folders, and the fast
end-to-end run of the whole method, whose held-out result is asserted (NDLB Sec. 4.6: SR with hard
bags and BagCurri beats MLE on TrueMatch), and whose report is opened in a real headless browser.

Margin of the end-to-end assertion: see ``test_fast_demo_sr_beats_mle_on_heldout_bags``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from demo.world import (
    CELLS,
    Scene,
    complete_description,
    generate_world,
    mentioned_attributes,
    sample_scene,
    scene_attributes,
    sparse_references,
    twin,
    twin_kind,
)

FAST_SEED = 0


# -- the world -------------------------------------------------------------------------------------

def test_world_is_deterministic_and_has_the_contract_columns():
    a = generate_world(6, 2, 3, seed=5, progress=False)
    b = generate_world(6, 2, 3, seed=5, progress=False)
    c = generate_world(6, 2, 3, seed=6, progress=False)
    assert list(a) == ["train", "val", "test"]
    assert {"cocoid", "image", "captions", "split"} <= set(a["train"].column_names)  # the "COCO dataset" format (docs/formats.md)
    ids = [i for split in a.values() for i in split["cocoid"]]
    assert len(set(ids)) == len(ids) == 11
    for split in a:
        assert a[split]["captions"] == b[split]["captions"] and a[split]["scene"] == b[split]["scene"]
        assert [np.asarray(x).tobytes() for x in a[split]["image"]] == [np.asarray(x).tobytes() for x in b[split]["image"]]
        assert all(len(refs) == 5 for refs in a[split]["captions"])
    assert a["train"]["scene"] != c["train"]["scene"]
    assert a["train"]["image"][0].size == (32, 32)


def test_references_are_faithful_and_sparse_and_the_complete_description_is_complete():
    rng = np.random.default_rng(0)
    per_ref, per_complete = [], []
    for _ in range(300):
        scene = sample_scene(rng)
        truth = scene_attributes(scene)
        complete = mentioned_attributes(complete_description(scene))
        assert complete == truth  # every attribute, nothing else
        for ref in sparse_references(scene, rng):
            said = mentioned_attributes(ref)
            assert said <= truth, (ref, said - truth)  # references never hallucinate
            per_ref.append(len(said))
        per_complete.append(len(complete))
    assert np.mean(per_ref) < 0.35 * np.mean(per_complete)  # "human" references name only some details


def test_twin_changes_exactly_one_attribute():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = sample_scene(rng)
        other = twin(scene, rng)
        assert complete_description(other) != complete_description(scene)
        if other.background != scene.background:
            assert other.objects == scene.objects
            continue
        changed = [(a, b) for a, b in zip(scene.objects, other.objects) if a != b]
        moved = {o.cell for o in scene.objects} != {o.cell for o in other.objects}
        if moved:  # one object moved to a free cell: the others are untouched
            assert len({(o.shape, o.colour, o.size) for o in scene.objects}
                       ^ {(o.shape, o.colour, o.size) for o in other.objects}) == 0
        elif twin_kind(scene, other) == "binding":  # two objects swapped colours
            assert len(changed) == 2 and sorted(a.colour for a, _ in changed) == sorted(b.colour for _, b in changed)
        else:
            assert len(changed) == 1
            a, b = changed[0]
            assert sum([a.shape != b.shape, a.colour != b.colour, a.size != b.size]) == 1
    assert Scene.from_json(scene.to_json()) == scene
    assert len(CELLS) == 4


def test_binding_twin_swaps_colours_between_two_objects_and_each_kind_can_be_forced():
    from demo.world import Obj, TWIN_KINDS, twin_kind, twin_kinds

    scene = Scene("grey", (Obj("ring", "red", "small", 0), Obj("bar", "blue", "large", 3)), 0)
    other = twin(scene, np.random.default_rng(0), kind="binding")
    assert [(o.shape, o.colour, o.size, o.cell) for o in other.objects] == [("ring", "blue", "small", 0),
                                                                           ("bar", "red", "large", 3)]
    assert twin_kind(scene, other) == "binding"
    # the same colours, shapes, sizes and cells: only which colour goes with which shape changed
    assert mentioned_attributes(complete_description(other)) == mentioned_attributes(complete_description(scene))
    assert complete_description(other) != complete_description(scene)
    same_colour = Scene("grey", (Obj("ring", "red", "small", 0), Obj("bar", "red", "large", 3)), 0)
    full = Scene("grey", tuple(Obj("ring", c, "small", k) for k, c in enumerate(["red", "blue", "pink", "cyan"])), 0)
    assert "binding" not in twin_kinds(same_colour) and "cell" not in twin_kinds(full)
    with pytest.raises(ValueError, match="binding"):
        twin(same_colour, np.random.default_rng(0), kind="binding")
    rng = np.random.default_rng(3)
    for _ in range(200):
        s = sample_scene(rng)
        for kind in twin_kinds(s):
            assert twin_kind(s, twin(s, rng, kind=kind)) == kind
    assert set(TWIN_KINDS) == {"shape", "colour", "size", "cell", "background", "binding"}


def test_faithfulness_counts_hallucinated_details():
    from demo.run import faithfulness
    from demo.world import Obj

    scene = Scene("grey", (Obj("ring", "red", "small", 0),), 0).to_json()
    out = faithfulness(["a small red ring.", "a large blue ring on white."], [scene, scene])
    # caption 1: 3 true; caption 2: ring true, large / blue / white false
    assert out["attribute_precision"] == pytest.approx(4 / 7)
    assert out["hallucinations_per_caption"] == pytest.approx(1.5)
    assert out["attributes_per_caption"] == pytest.approx(3.5)


def test_stage_fingerprints_redo_exactly_what_a_changed_setting_touches(tmp_path):
    from dataclasses import replace

    from demo.run import FULL, HEADLINE, Paths, stage_graph

    base = {s.name: s.fingerprint for s in stage_graph(FULL, Paths(tmp_path))}
    assert len(set(base.values())) == len(base)  # every stage has its own
    changed = {s.name for s in stage_graph(replace(FULL, sr_lora_lr=FULL.sr_lora_lr * 2), Paths(tmp_path))
               if s.fingerprint != base[s.name]}
    lora_runs = {r.name for r in FULL.sr_runs if r.lora_modules != "none"}
    assert HEADLINE in lora_runs
    assert changed == lora_runs | {f"{k}_{r}" for r in lora_runs for k in ("val", "eval")}
    judge = {s.name for s in stage_graph(replace(FULL, judge_b=dict(FULL.judge_b, steps=1)), Paths(tmp_path))
             if s.fingerprint != base[s.name]}
    assert "judge_b" in judge and "mining" in judge and "mle" not in judge and "judge_a" not in judge


def test_paired_bootstrap_interval():
    from demo.study import _mean_difference, bootstrap

    rng = np.random.default_rng(0)
    # seed 1: a beats b by 10 points on every bag; seed 2: by 30 points: the estimate is the mean over seeds
    seeds = [{"a": np.full(50, 0.6), "b": np.full(50, 0.5)}, {"a": np.full(80, 0.8), "b": np.full(80, 0.5)}]
    out = bootstrap(seeds, _mean_difference, n_boot=200)
    assert out["estimate"] == pytest.approx(20.0) and out["ci_low"] == pytest.approx(20.0)
    assert out["n_items"] == 130
    # no difference on average: the interval covers 0 and shrinks with more bags
    noise = [{"a": rng.integers(0, 2, 400).astype(float), "b": rng.integers(0, 2, 400).astype(float)}]
    wide = bootstrap(noise, _mean_difference, n_boot=2000)
    assert wide["ci_low"] < 0 < wide["ci_high"] and 4 < wide["ci_high"] - wide["ci_low"] < 20
    many = [{k: np.tile(v, 4) for k, v in noise[0].items()}]
    narrow = bootstrap(many, _mean_difference, n_boot=2000)
    assert narrow["ci_high"] - narrow["ci_low"] < 0.6 * (wide["ci_high"] - wide["ci_low"])


def test_positional_judge_recipe_changes_the_judges_and_what_depends_on_them(tmp_path):
    from demo.run import POSITIONAL_JUDGES, Paths, config_for, main, stage_graph

    base = config_for(False, 0)
    cfg = config_for(False, 0, judges="positional")
    for spec in (cfg.judge_a, cfg.judge_b):
        assert spec["position_init_std"] == 0.5 and spec["twin_fraction"] == 0.75
        assert spec["steps"] == base.judge_a["steps"]  # the rest of the judges' settings is kept
    assert cfg.judge_twin_weights == POSITIONAL_JUDGES["twin_weights"] and cfg.judge_twin_weights["cell"] == 20.0
    assert cfg.sr_lora_lr == POSITIONAL_JUDGES["sr"]["sr_lora_lr"] != base.sr_lora_lr  # re-selected on val bags
    assert base.judge_a.get("position_init_std") is None  # the default recipe is unchanged
    old = {s.name: s.fingerprint for s in stage_graph(base, Paths(tmp_path))}
    changed = {s.name for s in stage_graph(cfg, Paths(tmp_path)) if s.fingerprint != old[s.name]}
    assert {"judge_a", "judge_b", "mining", "mle"} <= changed and "world" not in changed and "gpt2_init" not in changed
    with pytest.raises(ValueError, match="unknown judge recipe 'blind'"):
        config_for(False, 0, judges="blind")
    with pytest.raises(SystemExit):
        main(["--judges", "blind"])


def test_position_embeddings_start_as_strong_as_asked_in_both_judges():
    from demo.judges import JudgeSpec, build_judge_a, build_judge_b
    from demo.world import train_tokenizer, world_texts

    tokenizer = train_tokenizer(world_texts(generate_world(8, 0, 0, seed=0, progress=False)))
    kw = dict(width=32, layers=1, heads=2, patch_size=8, text_width=32, text_layers=1, embed_dim=16)
    for std, expected in ((None, 0.02), (0.5, 0.5)):
        model_a, _ = build_judge_a(tokenizer, JudgeSpec(**kw, position_init_std=std))
        pos_a = model_a.vision_model.embeddings.position_embedding.weight
        assert abs(float(pos_a.detach().std()) - expected) < 0.25 * expected
    model_b, *_ = build_judge_b(JudgeSpec(**kw, position_init_std=0.5))
    assert abs(float(model_b.visual.positional_embedding.detach().std()) - 0.5) < 0.125
    default_b, *_ = build_judge_b(JudgeSpec(**kw))
    assert float(default_b.visual.positional_embedding.detach().std()) < 0.3  # open_clip's own, width ** -0.5 = 0.18


def test_selection_picks_by_val_score_only_and_keeps_its_judge_recipe(tmp_path, monkeypatch):
    """demo.select on a fake run_demo: the learning rate and mode with the best mean val R@1 win, the
    length limit with the largest gain over the MLE at the same limit wins, every configuration it asks
    for reads no test bag and carries the chosen judge recipe, and a folder selected with another
    recipe is refused."""
    import demo.run
    from demo.select import LIMITS, LR_GRID, main, select

    seen = []
    val_score = {("none", 3e-5): 60.0, ("none", 1e-4): 64.0, ("none", 3e-4): 50.0,
                 ("LV", 1e-5): 66.0, ("LV", 3e-5): 62.0, ("LV", 1e-4): 61.0}
    gain = {12: 0.5, 14: 2.0, 16: 1.0}

    def fake_run_demo(out, cfg, jobs, threads):
        seen.append(cfg)
        sizes = cfg.bag_sizes
        records = {"val_mle_complete": {"metrics": {f"val_truematch_r1_{s}": 50.0 for s in sizes}}}
        for limit in cfg.val_limits:
            records[f"val_mle_complete@{limit}"] = {"metrics": {f"val_truematch_r1_{s}": 40.0 for s in sizes}}
        for run in cfg.select_runs:
            limit = run.caption_tokens or cfg.caption_tokens
            init = 50.0 if limit == cfg.caption_tokens else 40.0
            score = init + gain[limit] if run.name.startswith("sel_len") else val_score[(run.lora_modules, run.learning_rate)]
            records[run.name] = {"best_step": 3, "max_steps": 5}
            records[f"val_{run.name}"] = {"metrics": {f"val_truematch_r1_{s}": score for s in sizes}}
        return {"stages": records}

    monkeypatch.setattr(demo.run, "run_demo", fake_run_demo)
    result = select(tmp_path, judges="positional")
    assert result["lr"]["best_lr"] == {"none": 1e-4, "LV": 1e-5} and result["lr"]["mode"] == "LV"
    assert len(result["lr"]["table"]) == sum(len(v) for v in LR_GRID.values())
    assert [t["limit"] for t in result["length"]["table"]] == list(LIMITS)
    # the default limit reuses phase 1's run (LV at 1e-5: 66 - 50 = 16 points): it wins here
    assert result["length"]["limit"] == demo.run.FULL.caption_tokens
    assert result["judges"] == "positional"
    assert all(not cfg.test_eval and cfg.sr_runs == () and cfg.judge_b["position_init_std"] == 0.5 for cfg in seen)
    assert json.loads((tmp_path / "selection.json").read_text())["judges"] == "positional"
    with pytest.raises(ValueError, match="positional"):
        select(tmp_path, judges="default")
    assert main(["--out", str(tmp_path), "--judges", "default"]) == 1


# -- the judges' folders ------------------------------------------------------------------------------

def test_judges_save_load_and_share_the_vision_tower(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from demo.judges import JudgeSpec, build_judge_a, build_judge_b, pixel_tensor, save_judge_b
    from demo.world import train_tokenizer, world_texts
    from metrics.clip_judge import ClipJudge

    world = generate_world(8, 0, 0, seed=0, progress=False)
    tokenizer = train_tokenizer(world_texts(world))
    spec = JudgeSpec(width=32, layers=1, heads=2, text_width=32, text_layers=1, embed_dim=16)
    model_a, processor = build_judge_a(tokenizer, spec)
    model_a.save_pretrained(tmp_path / "A")
    tokenizer.save_pretrained(tmp_path / "A")
    processor.save_pretrained(tmp_path / "A")
    model_b, _, _, cfg = build_judge_b(JudgeSpec(width=32, layers=1, heads=2, patch_size=8, text_width=32,
                                                 text_layers=1, embed_dim=16))
    save_judge_b(model_b, cfg, tmp_path / "B")
    judge_a = ClipJudge.from_pretrained(str(tmp_path / "A"), device="cpu")
    judge_b = ClipJudge.from_pretrained(str(tmp_path / "B"), device="cpu")
    assert (judge_a.backend, judge_b.backend) == ("transformers", "open_clip")
    images = world["train"]["image"]
    pixels = pixel_tensor(images, 32)
    # what the judges are trained on == what their own preprocessing gives at scoring time
    for judge in (judge_a, judge_b):
        assert torch.allclose(judge.embed_images(images), judge.embed_images(pixels), atol=1e-5)
    # the captioner's vision tower (paper: the same CLIP) loads from judge A's folder, projection included
    tower = CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "A")).eval()
    with torch.no_grad():
        embeds = torch.nn.functional.normalize(tower(pixel_values=pixels).image_embeds, dim=-1)
    assert torch.allclose(embeds, judge_a.embed_images(pixels), atol=1e-5)
    # and a reloaded B reproduces the trained object's text embeddings
    texts = world["train"]["complete"][:3]
    fresh = ClipJudge.from_open_clip(model_b, *_open_clip_parts(cfg), name="B0", device="cpu")
    assert torch.allclose(fresh.embed_texts(texts), judge_b.embed_texts(texts), atol=1e-5)


def _open_clip_parts(cfg):
    import open_clip

    from demo.judges import OPENAI_MEAN, OPENAI_STD

    return (open_clip.image_transform(32, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD),
            open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"]))


# -- the whole method, fast variant -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    from demo.run import run_demo

    out = tmp_path_factory.mktemp("demo_fast")
    start = time.time()
    summary = run_demo(out, fast=True, seed=FAST_SEED)
    return out, summary, time.time() - start


def test_fast_demo_sr_beats_mle_on_heldout_bags(fast_run):
    """SR (bags + BagCurri) beats MLE at retrieving held-out test images among 49 random
    distractors (bags of 50 drawn from the test split), scored by the independent judge B, which
    never took part in training; captions stay faithful and CIDEr-D does not collapse.

    Margin, from fast runs (``python -m demo.run --fast --seed S``, judge B, random-distractor R@1
    on 800 test images): with the current settings (val split of 200 images, full fine-tuning at
    lr 1e-4, 14 tokens) seed 0 gave MLE 21.0 -> SR 46.2 (+25.2), seed 1 17.6 -> 38.4 (+20.8),
    seed 2 19.9 -> 43.3 (+23.4), CIDEr-D up in all three (0.82 -> 0.98, 0.81 -> 1.19,
    0.88 -> 1.20); earlier variants of the fast run
    gave +31.7 and +34.8 (seeds 0 and 1) and, before the world's objects were centred and judge A
    moved to 8 px patches, +16.2 to +20.4 (three seeds). The binomial standard error of one R@1
    here is ~1.8 points, so +15 (below every gain seen, 5 standard errors) cannot come from noise
    and leaves room for run-to-run spread.

    What the fast variant does NOT show: a TrueMatch gain. On its bags (156 / 73 / 48 bags of
    3 / 5 / 7 for seed 0) earlier variants had SR beat MLE by small margins only (seed 0: +1.9 /
    +0.5 / +5.1 points; seed 1: +2.6 / +4.2 / +4.3); with the current settings SR - MLE is
    seed 0 -0.2 / +0.9 / +1.3, seed 1 -2.3 / -6.3 / -0.8, seed 2 -0.5 / -5.6 / -7.9, i.e. no gain
    (standard errors ~2.3 points on 156 bags of 3, ~5 on 48 bags of 7). Its judges are trained
    for 300 steps and SR runs ~190 steps. The full ``make demo`` (README) is
    where the TrueMatch comparison is made, and it is reported as measured there.
    """
    out, summary, seconds = fast_run
    results = json.loads((out / "results.json").read_text())
    mle, sr = results["mle"], results["sr_bags_curri"]
    keys = ["truematch_r1_3", "truematch_r1_5", "truematch_r1_7", "random_r1", "cider", "vocab", "attribute_precision",
            "hallucinations_per_caption", "val_truematch_r1_3"]
    for model in ("mle", "sr_bags_curri"):
        assert all(k + "_reward_judge" in results[model] for k in keys[:4]), results[model].keys()
        assert all(k in results[model] for k in keys), results[model].keys()
        assert all(0.0 <= results[model][k] <= 100.0 for k in keys[:4])
        # the per-bag hits the study bootstraps over reproduce the reported R@1
        hits = json.loads((out / "hits" / f"{model}.json").read_text())
        for s in (3, 5, 7):
            members = [h for bag in hits[str(s)] for h in bag]
            assert 100.0 * np.mean(members) == pytest.approx(results[model][f"truematch_r1_{s}"])
            assert all(len(bag) == s for bag in hits[str(s)])
    assert sr["random_r1"] - mle["random_r1"] >= MARGIN_RANDOM_R1, (sr, mle)
    assert sr["random_r1_reward_judge"] > mle["random_r1_reward_judge"], (sr, mle)
    assert sr["attribute_precision"] >= mle["attribute_precision"] - 0.05  # no hallucination bought
    assert sr["cider"] >= 0.5 * mle["cider"]  # SR must not turn captions into gibberish
    # the reference rows frame the scale: complete descriptions solve the (solvable-filtered) bags
    references = results["meta"]["references"]
    assert references["reference_complete"]["truematch_r1_3"] == 100.0
    meta = results["meta"]
    assert meta["seed"] == FAST_SEED and meta["fast"] is True and meta["resumed"] is False
    assert set(meta["stage_seconds"]) >= {"world", "judge_a", "judge_b", "mle", "mining", "sr_bags_curri",
                                          "eval_mle", "eval_sr_bags_curri", "val_mle", "val_sr_bags_curri"}
    # the checkpoint kept is the one with the best val R@1 (judge B, val bags of 3)
    run = meta["sr_runs"]["sr_bags_curri"]
    curve = json.loads((out / "stages" / "sr_bags_curri.json").read_text())["val_curve"]
    assert run["best_val_r1_bags_3"] == max(r for _, r in curve) and run["best_step"] in [st for st, _ in curve]
    assert run["best_step"] <= run["max_steps"] and len(curve) >= 2
    # the judges are measured per kind of minimal pair on held-out test pairs
    pairs = meta["judges"]["B (evaluation, open_clip)"]["pairs"]["test"]
    assert {"shape", "colour", "size", "cell", "binding", "background", "all"} <= set(pairs)
    claims = {c["claim"]: c for c in meta["claims"]}
    gains = [sr[f"truematch_r1_{s}"] - mle[f"truematch_r1_{s}"] for s in (3, 5, 7)]
    claim = claims["From the sparse-reference MLE, SR + BagCurri beats MLE on every bag size"]
    assert claim["held"] is all(g > 0 for g in gains)  # reported as measured


MARGIN_RANDOM_R1 = 15.0


def test_rerun_reuses_finished_stages(fast_run):
    from demo.run import run_demo

    out, summary, _ = fast_run
    start = time.time()
    again = run_demo(out, fast=True, seed=FAST_SEED)
    assert time.time() - start < 60
    assert again["results"] == summary["results"]


def test_report_renders_in_headless_browser(fast_run, tmp_path):
    from selenium.webdriver.common.by import By

    from tests.browser import headless_chrome

    out, _, _ = fast_run
    driver = headless_chrome(tmp_path)
    try:
        driver.get((out / "report.html").resolve().as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 3 + 3  # plots + one example bag of 3
        widths = [driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)
                  for im in images]
        assert all(w and w > 0 for w in widths), widths
        table = driver.find_element(By.ID, "results_eval")
        rows = table.find_elements(By.TAG_NAME, "tr")
        assert any("sr_bags_curri" in r.text for r in rows) and any("mle" in r.text for r in rows)
        assert driver.find_element(By.ID, "claims").text
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()


# -- the diagnosis of what holds the hardest bags back ----------------------------------------------

def test_shape_naming_counts_each_colour_shape_mention_against_its_object():
    from demo.diagnose import shape_naming
    from demo.world import Obj

    scene = Scene("grey", (Obj("ring", "red", "small", 0), Obj("bar", "blue", "large", 3)), 0)
    same_colour = Scene("grey", (Obj("ring", "red", "small", 0), Obj("bar", "red", "large", 3)), 0)
    out = shape_naming(["a red hoop and a blue circle.", "a red ring.", "a green bar."], [scene, same_colour, scene])
    # "red hoop" is right (a synonym of ring), "blue circle" wrong; two red objects: skipped; green: absent
    assert out["all"] == {"accuracy": 0.5, "mentions": 2}
    assert out["small_2"] == {"accuracy": 1.0, "mentions": 1} and out["large_2"] == {"accuracy": 0.0, "mentions": 1}


def test_candidate_captions_respect_the_length_limit_and_name_only_true_details():
    from transformers import GPT2TokenizerFast

    from demo.diagnose import candidate_captions
    from demo.world import Obj, train_tokenizer

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(200)]
    tokenizer = train_tokenizer([complete_description(s) for s in scenes] + [r for s in scenes for r in sparse_references(s, rng)])
    assert isinstance(tokenizer, GPT2TokenizerFast)
    scene = Scene("white", (Obj("circle", "red", "large", 0), Obj("pillar", "cyan", "small", 1),
                            Obj("ring", "pink", "small", 2)), 0)
    captions = candidate_captions(scene, tokenizer, 12)
    assert "a large red circle at the top left on white." in captions
    assert "a red circle and a cyan pillar and a pink ring." in captions  # 12 tokens
    assert "a red circle and a cyan pillar and a pink ring on white." not in captions  # 14
    assert all(len(tokenizer(c)["input_ids"]) <= 12 for c in captions)
    assert not any("and" in c and c.count(" at the ") == 3 for c in captions)  # three placed objects never fit
    truth = scene_attributes(scene)
    assert all(mentioned_attributes(c) <= truth for c in captions)


def test_probe_reads_what_the_features_hold():
    from demo.diagnose import attribute_targets, probe

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(1200)]
    y = attribute_targets(scenes)
    assert y["occupied_cells"].sum(1).tolist() == [len(s.objects) for s in scenes]
    noise = torch.randn(1200, 16, generator=torch.Generator().manual_seed(0))
    informative = torch.cat([y["occupied_cells"], noise], 1)  # features that hold the cells
    readable = probe(informative[:1000], y["occupied_cells"][:1000], informative[1000:], y["occupied_cells"][1000:], epochs=10)
    blind = probe(noise[:1000], y["occupied_cells"][:1000], noise[1000:], y["occupied_cells"][1000:], epochs=10)
    assert readable["exact"] > 0.95 and blind["exact"] < 0.3, (readable, blind)


def test_diagnosis_of_the_fast_demo(fast_run):
    """The caption-length bound and the probes on the fast run. Measured on the fast run of seed 0
    (40 bags of 3): bound 95.8 vs the best trained system 52.1; judge B's embedding: colour-set
    recall 0.89 vs shape-set recall 0.61; raw-pixel probe of occupied cells: recall 0.91."""
    from demo.diagnose import diagnose

    out, _, _ = fast_run
    result = diagnose(out, sizes=(3,), max_bags=40, probe_epochs=6, progress=False)
    assert json.loads((out / "diagnosis.json").read_text())["caption_bound"] == result["caption_bound"]
    bound = result["caption_bound"]["3"]
    assert bound["members"] == 3 * min(40, len(json.loads((out / "truematch" / "3.json").read_text())))
    # the length limit is not what holds the captioners back: ideal short captions solve the bags
    trained = result["truematch_r1"]["3"]
    assert set(trained) == {"mle", "sr_bags_curri"}
    assert bound["r1"] >= 80.0 and bound["r1"] > max(trained.values()) + 20, (bound, trained)
    assert result["shape_naming"]["reference_complete"]["all"]["accuracy"] == 1.0
    probes = result["judge_probes"]
    assert probes["pixels"]["occupied_cells"]["recall"] > 0.8  # the probe can read the picture
    judge_b = probes["judge B embedding"]
    assert judge_b["colour_set"]["recall"] > judge_b["shape_set"]["recall"] + 0.1  # colours, not shapes


def test_diagnose_cli_names_the_missing_run(tmp_path, capsys):
    from demo.diagnose import main

    assert main(["--out", str(tmp_path / "nothing"), "--no_probes"]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err and "python -m demo.run --out" in err
