"""The paper's SR recipe is the default (NDLB Sec. 4, App. B.3, C.2-C.4; the authors' code where the
paper is silent): logit-scaled Eq. 1, the authors' LoRA init, curriculum, optimiser, evaluation and
CIDEr options, and one YAML recipe per paper experiment."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from metrics.clip_judge import ClipJudge
from tests import tiny
from trainers import (
    AUTHORS_BAG_CURRICULUM,
    CiderReward,
    SelfRetrievalReward,
    SRConfig,
    SRTrainer,
    init_lora_as_authors,
    parse_bag_schedule,
    sr_lora_config,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def scaled_judge(tmp_path_factory, tokenizer):
    """A tiny transformers CLIP judge whose learned logit scale is 25 (not 1, not 100)."""
    from transformers import CLIPModel

    folder = tiny.save_tiny_clip_judge(tmp_path_factory.mktemp("judge25"), tokenizer, seed=3)
    model = CLIPModel.from_pretrained(folder)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(25.0))
    model.save_pretrained(folder)
    return ClipJudge.from_pretrained(str(folder))


# -- Eq. 1 with the judge's logit scale ---------------------------------------------------------


def test_judges_expose_their_logit_scale(scaled_judge, tiny_open_clip_model):
    assert scaled_judge.logit_scale == pytest.approx(25.0, rel=1e-6)
    import open_clip

    oc = ClipJudge.from_open_clip(tiny_open_clip_model, lambda im: torch.zeros(3, 32, 32),
                                  open_clip.get_tokenizer("ViT-B-32"), name="tiny")
    assert oc.logit_scale == pytest.approx(tiny_open_clip_model.logit_scale.exp().item(), rel=1e-6)
    assert oc.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's initial value


def test_default_reward_is_log_softmax_of_logit_scaled_cosines(scaled_judge):
    images = tiny.random_images(4, size=32, seed=5)
    captions = ["a red circle.", "two blue squares", "a green star at the top", "a red circle."]
    ids = [10, 11, 12, 13]
    reward = SelfRetrievalReward(scaled_judge)  # scale="judge" by default
    assert reward.scale == pytest.approx(25.0, rel=1e-6)
    got = reward(completions=captions, cocoid=ids, image=images)
    # by hand: exp(logit_scale) * cos, log-softmax over the 4 images of the batch
    text = scaled_judge.embed_texts(captions).double()
    image = scaled_judge.embed_images(images).double()
    cos = (text / text.norm(dim=1, keepdim=True)) @ (image / image.norm(dim=1, keepdim=True)).T
    expected = [float(25.0 * cos[t, t] - torch.logsumexp(25.0 * cos[t], 0)) for t in range(4)]
    assert got == pytest.approx(expected, abs=1e-4)
    raw = SelfRetrievalReward(scaled_judge, scale=1.0)(completions=captions, cocoid=ids, image=images)
    assert raw == pytest.approx([float(cos[t, t] - torch.logsumexp(cos[t], 0)) for t in range(4)], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(got, raw)) > 1e-3  # the scale matters for the reward
    with pytest.raises(ValueError, match="logit scale"):
        SelfRetrievalReward(object())  # a duck-typed judge without a logit scale needs a number
    with pytest.raises(ValueError, match="> 0"):
        SelfRetrievalReward(scaled_judge, scale=0.0)


# -- LoRA initialised as the authors' finetuning/lora.py -------------------------------------------


def test_lora_starts_like_the_authors(tokenizer, tmp_path):
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=7)
    args = SRConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bag_schedule="rand")
    trainer = SRTrainer(model, [lambda completions, **kw: [0.0] * len(completions)], args=args,
                        processing_class=processor, peft_config=sr_lora_config("LV"))
    a = {n: p for n, p in trainer.model.named_parameters() if "lora_A" in n}
    b = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert a and len(a) == len(b)
    assert any("language_model" in n for n in a) and any("vision_model" in n for n in a)
    for name, p in a.items():
        assert 0.9 <= p.std().item() <= 1.1, name  # N(0, 1), not PEFT's Kaiming (std ~ 1/sqrt(3 fan_in))
    assert all(p.abs().max().item() == 0 for p in b.values())
    # the merged model is unchanged at the start: B = 0
    peft = sr_lora_config("L", rank=8)
    kept = SRTrainer(tiny.build_tiny_clipcap(tokenizer, seed=7)[0], [lambda completions, **kw: [0.0] * len(completions)],
                     args=SRConfig(output_dir=str(tmp_path / "p"), use_cpu=True, report_to="none", bag_schedule="rand",
                                   lora_init="peft"), processing_class=processor, peft_config=peft)
    stds = [p.std().item() for n, p in kept.model.named_parameters() if "lora_A" in n]
    assert max(stds) < 0.5  # "peft" keeps PEFT's own init
    assert init_lora_as_authors(kept.model) == len(stds)


# -- defaults: curriculum, epochs, optimiser, evaluation -------------------------------------------


def test_defaults_are_the_authors_recipe(tmp_path):
    args = SRConfig(output_dir=str(tmp_path))
    # configs/sr.yml (commit 3db9c82): {3: 2, 8: 3, 10: 5, 12: 7, 14: 10, 17: 15, 20: 20}
    assert args.bag_schedule == AUTHORS_BAG_CURRICULUM
    assert parse_bag_schedule(args.bag_schedule) == [2] * 3 + [3] * 5 + [5] * 2 + [7] * 2 + [10] * 2 + [15] * 3 + [20] * 3
    assert parse_bag_schedule({3: 2, 8: 3, 10: 5, 12: 7, 14: 10, 17: 15, 20: 20}) == parse_bag_schedule(args.bag_schedule)
    assert args.num_train_epochs == 20
    assert (args.learning_rate, args.lr_scheduler_type, args.per_device_train_batch_size) == (9e-8, "constant", 100)
    assert (args.weight_decay, args.max_grad_norm) == (0.01, 0.0)
    assert args.optim in ("adamw_torch", "adamw_torch_fused")  # torch.optim.AdamW (fused: the same update)
    assert (args.temperature, args.top_k, args.logprob_reduction, args.baseline) == (0.3, 0, "mean", "auto")
    assert (args.eval_num_beams, args.eval_random_batch_size, args.lora_init) == (5, 100, "authors")
    with pytest.raises(ValueError, match="last_epoch:size"):
        SRConfig(output_dir=str(tmp_path), bag_schedule="3:2,x:3")


def test_training_bags_default_to_the_curriculum_sizes():
    from datasets_scripts import truematch

    args = truematch.build_parser().parse_args(["training-bags", "--dataset", "x", "--out", "y"])
    assert list(args.sizes) == [2, 3, 5, 7, 10, 15, 20]


def test_optimizer_decays_every_parameter_and_never_clips(tokenizer, tmp_path, monkeypatch):
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=1)
    args = SRConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bag_schedule="rand")
    trainer = SRTrainer(model, [lambda completions, **kw: [0.0] * len(completions)], args=args,
                        processing_class=processor, peft_config=sr_lora_config("LV", rank=4))
    optimizer = trainer.create_optimizer()
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] == 0.01 for p in g["params"]]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(decayed) == len(trainable)  # biases and LayerNorm too, as torch.optim.AdamW(params)
    assert type(optimizer).__name__ == "AdamW"


def test_random_batch_evaluation_and_five_beams(tokenizer, tmp_path, tiny_clip_judge_dir):
    judge = ClipJudge.from_pretrained(str(tiny_clip_judge_dir))
    data = tiny.caption_dataset(10, seed=3)
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=2)
    args = SRConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bag_schedule="rand",
                    eval_random_batch_size=4, max_new_tokens=5, seed=3)
    trainer = SRTrainer(model, [SelfRetrievalReward(judge)], args=args, processing_class=processor, eval_dataset=data,
                        eval_judge=judge)
    batches = trainer.random_batches(10)
    assert [len(b) for b in batches] == [4, 4] and len(set(sum(batches, []))) == 8  # remainder dropped
    assert batches == trainer.random_batches(10)  # fixed by the seed
    calls = []
    original = trainer.model.generate

    def spy(**kw):
        calls.append(kw.get("num_beams"))
        return original(**kw)

    trainer.model.generate = spy
    metrics = trainer.evaluate()
    assert calls and set(calls) == {5}  # the authors evaluate with 5 beams
    captions = trainer.caption(data)
    text, image = judge.embed_texts(captions), judge.embed_images(list(data["image"]))
    correct = []
    for batch in batches:
        sims = text[batch] @ image[batch].T
        correct += [bool(sims[i, i] > max(sims[i, j] for j in range(len(batch)) if j != i)) for i in range(len(batch))]
    assert metrics["eval_r1_random"] == pytest.approx(100 * sum(correct) / len(correct))
    assert "eval_r1_bags" not in metrics  # no held-out bags given


# -- CIDEr reward: HolisticCap strings, the authors' per-batch document frequencies ----------------


def test_cider_reward_wraps_a_single_string_reference():
    refs = {1: "a large red circle on the left of a blue square", 2: "two small green stars at the top"}
    reward = CiderReward(refs, references_column="holisticcap")
    exact, other = reward(completions=[refs[1], refs[2]], cocoid=[1, 1])
    assert exact > 0.5 and other < exact  # an exact match scores (not 0.0 as with list("a cat"))
    with pytest.raises(TypeError, match="'holisticcap'"):
        CiderReward({1: 3.5}, references_column="holisticcap")
    with pytest.raises(TypeError, match="'captions' of image 7"):
        CiderReward({7: ["ok", None]})


def test_cider_reward_with_batch_document_frequencies_equals_pycocoevalcap_on_the_batch():
    from pycocoevalcap.cider.cider import Cider

    refs = {1: ["a red circle on the left", "a red shape"], 2: ["two blue squares", "blue squares on the right"],
            3: ["a green star at the top", "a star"]}
    cands = ["a red circle", "two squares on the right", "a star at the top"]
    reward = CiderReward(document_frequency="batch")
    ours = reward(completions=cands, cocoid=[1, 2, 3], captions=[refs[1], refs[2], refs[3]])
    _, theirs = Cider().compute_score(refs, {k: [c] for k, c in zip((1, 2, 3), cands)})
    assert ours == pytest.approx(list(theirs), abs=1e-9)
    # document frequencies depend on the batch: the same caption scores differently in another batch
    alone = reward(completions=cands[:2], cocoid=[1, 2], captions=[refs[1], refs[2]])
    assert alone[0] != pytest.approx(ours[0], abs=1e-6)
    with pytest.raises(ValueError, match="corpus"):
        CiderReward(document_frequency="batchwise")


# -- one YAML recipe per paper experiment --------------------------------------------------------


def test_every_recipe_parses_into_the_scripts_arguments(tmp_path):
    import train_mle
    import train_sr

    assert len(RECIPES) >= 25
    names = {p.stem for p in RECIPES}
    assert {"ndlb", "sr_l", "sr_v", "sr_lv", "sr_lv_bagcurri", "table10_rand", "table10_bagcurri", "table13_lambda05",
            "cider_holisticcap", "mle_coco", "mle_blendcap", "mle_holisticcap"} <= names
    assert {f"table10_bag{s}" for s in (2, 3, 5, 7, 10, 15, 20)} <= names
    for path in RECIPES:
        text = path.read_text()
        assert "Paper:" in text, path.name  # every recipe cites its table row / section
        raw = yaml.safe_load(text)
        required = ["--dataset", "coco", "--output_dir", str(tmp_path / path.stem)]
        if path.stem.startswith("mle_"):
            script_args, training_args = train_mle.TrlParser(
                (train_mle.MLEArguments, train_mle.MLETrainingArguments)).parse_args_and_config(
                ["--config", str(path), *required])
            assert training_args.learning_rate == raw["learning_rate"] == 2e-5
            assert script_args.caption_column == raw["caption_column"]
        else:
            model_args, script_args, config = train_sr.parse_args(["--config", str(path), "--model", "m", *required])
            assert config.learning_rate == raw["learning_rate"], path.name
            assert model_args.lora_modules == raw["lora_modules"]
            sizes = set(parse_bag_schedule(config.bag_schedule)) - {0}
            listed = {int(Path(b).stem.rsplit("_", 1)[1]) for b in script_args.bags}
            assert sizes <= listed, path.name  # every size of the schedule has its bag file
            if "cider" in script_args.rewards:
                assert config.learning_rate in (1e-7, 1e-6)  # App. C.3
    ndlb = train_sr.parse_args(["--config", str(ROOT / "recipes" / "ndlb.yaml"), "--model", "m",
                                "--learning_rate", "3e-7", *required])
    assert ndlb[2].learning_rate == 3e-7  # the command line overrides the recipe
    assert ndlb[1].rewards == ["sr", "cider"] and ndlb[2].reward_weights == [1.0, 0.5]


def test_a_recipe_runs_two_steps_on_tiny_fixtures(tmp_path, tiny_clipcap_dir, tiny_clip_judge_dir):
    import json

    import datasets

    import train_sr

    data_dir = tmp_path / "coco"
    datasets.DatasetDict({"train": tiny.caption_dataset(24)}).save_to_disk(data_dir)
    bag_dir = tmp_path / "train_bags"
    bag_dir.mkdir()
    for s in (2, 3, 5, 7, 10, 15, 20):
        ids = list(range(1000, 1024))
        (bag_dir / f"train_bags_{s}.json").write_text(json.dumps(
            {"bag_size": s, "cocoids": [ids[i:i + s] for i in range(0, 24 - s + 1, s)]}))
    recipe = yaml.safe_load((ROOT / "recipes" / "table10_bagcurri.yaml").read_text())
    config = tmp_path / "recipe.yaml"
    recipe["bags"] = [str(bag_dir / Path(b).name) for b in recipe["bags"]]
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "sr"
    metrics = train_sr.main(["--config", str(config), "--model", str(tiny_clipcap_dir), "--dataset", str(data_dir),
                             "--judge", str(tiny_clip_judge_dir), "--output_dir", str(out), "--max_steps", "2",
                             "--per_device_train_batch_size", "20", "--max_new_tokens", "4", "--lora_rank", "4",
                             "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--logging_steps", "1"])
    assert metrics["train_loss"] is not None
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert [h["bags/size"] for h in state["log_history"] if "bags/size" in h] == [2.0, 2.0]  # epoch 1: bags of 2
    settings = json.loads((out / "training_args.json").read_text())
    assert settings["lora_modules"] == "LV" and settings["bag_schedule"] == AUTHORS_BAG_CURRICULUM
