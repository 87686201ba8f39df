"""SRTrainer, rewards, baselines, bags and curriculum on tiny models (NDLB Sec. 4, App. B-C)."""

import math
import warnings

import pytest
import torch
from transformers import TrainerControl, TrainerState

from metrics.clip_judge import ClipJudge
from tests import tiny
from trainers import (
    BagBatchSampler,
    BagCurriculumCallback,
    CiderReward,
    GreedyBaseline,
    LeaveOneOutBaseline,
    MeanBaseline,
    SelfRetrievalReward,
    SRTrainer,
    completion_mask,
    parse_bag_schedule,
    sr_lora_config,
)

N_IMAGES = 24


@pytest.fixture(scope="module")
def sr_data():
    return tiny.caption_dataset(N_IMAGES)


@pytest.fixture(scope="module")
def judge(tiny_clip_judge_dir):
    return ClipJudge.from_pretrained(str(tiny_clip_judge_dir))


def bags_of(size, n=N_IMAGES):
    return [list(range(i, i + size)) for i in range(0, n - n % size, size)]


sr_config = tiny.sr_config


# -- rewards -----------------------------------------------------------------------------------


class FixedJudge:
    """A judge whose embeddings are given by hand (duck-typed ClipJudge)."""

    def __init__(self, texts: dict, images: dict):
        self.texts, self.images, self.image_calls = texts, images, 0

    def embed_texts(self, captions, progress=False):
        return torch.stack([self.texts[c] for c in captions])

    def embed_images(self, images, ids=None, progress=False):
        self.image_calls += 1
        return torch.stack([self.images[i] for i in images])


def unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_self_retrieval_reward_is_eq1_log_softmax_by_hand():
    images = {"A": unit(1, 0), "B": unit(0, 1), "C": unit(1, 1)}
    texts = {"cap a": unit(1, 0.2), "cap b": unit(0.1, 1), "cap c": unit(1, 1)}
    judge = FixedJudge(texts, images)
    reward = SelfRetrievalReward(judge, scale=1.0)
    ids = [1, 2, 3, 1]
    out = reward(completions=["cap a", "cap b", "cap c", "cap b"], cocoid=ids, image=["A", "B", "C", "A"])

    def cos(t, i):
        return float(torch.dot(texts[t], images[i]))

    def eq1(t, target):  # log( e^sim(c,i) / sum_i' e^sim(c,i') ) over the batch images A, B, C
        return cos(t, target) - math.log(sum(math.exp(cos(t, i)) for i in "ABC"))

    expected = [eq1("cap a", "A"), eq1("cap b", "B"), eq1("cap c", "C"), eq1("cap b", "A")]
    assert out == pytest.approx(expected, abs=1e-6)
    # image embeddings are computed once per id and cached
    reward(completions=["cap a"], cocoid=[1], image=["A"])
    assert judge.image_calls == 1
    # within-bag: caption 0 competes with image B only (its bag), not with C
    bagged = SelfRetrievalReward(FixedJudge(texts, images), scale=1.0, within_bag=True)
    out = bagged(completions=["cap a", "cap b", "cap c"], cocoid=[1, 2, 3], image=["A", "B", "C"], bag_id=[0, 0, 1])
    assert out[0] == pytest.approx(cos("cap a", "A") - math.log(math.exp(cos("cap a", "A")) + math.exp(cos("cap a", "B"))))
    assert out[2] == pytest.approx(0.0, abs=1e-6)  # alone in its bag: log 1
    # scale multiplies the similarities
    warm = SelfRetrievalReward(FixedJudge(texts, images), scale=2.0)
    t = warm(completions=["cap a"] * 3, cocoid=[1, 2, 3], image=["A", "B", "C"])[0]
    assert t == pytest.approx(2 * cos("cap a", "A") - math.log(sum(math.exp(2 * cos("cap a", i)) for i in "ABC")))


def test_cider_reward_equals_pycocoevalcap_with_training_document_frequencies():
    from pycocoevalcap.cider.cider import Cider

    refs = {1: ["a red circle on the left", "a red shape"], 2: ["two blue squares", "blue squares on the right"],
            3: ["a green star at the top", "a star"], 4: ["a yellow diamond", "one yellow diamond in the middle"]}
    cands = {1: "a red circle", 2: "two squares on the right", 3: "a star at the top", 4: "a yellow circle"}
    reward = CiderReward(refs)
    ours = reward(completions=list(cands.values()), cocoid=list(cands))
    # pycocoevalcap computes document frequencies from the refs it is given: here the whole corpus
    _, theirs = Cider().compute_score({k: v for k, v in refs.items()}, {k: [v] for k, v in cands.items()})
    assert ours == pytest.approx(list(theirs), abs=1e-9)
    # a sub-batch keeps the corpus document frequencies: same score for the same caption
    assert reward(completions=["a star at the top"], cocoid=[3])[0] == pytest.approx(ours[2], abs=1e-12)


# -- baselines -----------------------------------------------------------------------------------


def test_baselines_on_known_rewards():
    mean = MeanBaseline()
    seen = []
    for batch in ([1.0, 3.0], [5.0], [0.0, 0.0, 3.0]):
        r = torch.tensor(batch)
        seen.append(mean(r)[0].item())
        mean.update(r.mean().item())
    assert seen == [0.0, 2.0, 3.5]  # running mean of the past batch means, before the update
    assert mean.state_dict() == {"name": "mean", "mean": pytest.approx(8 / 3), "count": 3}
    greedy = GreedyBaseline()(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 1.5]))
    assert greedy.tolist() == [0.5, 0.5, 1.5, 1.5]
    loo = LeaveOneOutBaseline(3)(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert loo.tolist() == [2.5, 2.0, 1.5, 5.5, 5.0, 4.5]
    with pytest.raises(ValueError, match="num_generations"):
        LeaveOneOutBaseline(1)


def test_completion_mask_keeps_tokens_up_to_first_stop():
    ids = torch.tensor([[5, 6, 14, 0, 0], [5, 14, 7, 14, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0]])
    mask = completion_mask(ids, stop_ids=[0, 14])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


# -- bags and curriculum ---------------------------------------------------------------------------


def test_bag_sampler_keeps_bags_whole_and_curriculum_changes_size():
    bags = {3: bags_of(3), 5: bags_of(5)}
    sampler = BagBatchSampler(N_IMAGES, 6, bags, parse_bag_schedule("rand,3,5"), seed=1)
    callback = BagCurriculumCallback(sampler)
    seen = {}
    for epoch in range(4):
        callback.on_epoch_begin(None, TrainerState(epoch=float(epoch)), TrainerControl())
        batches = list(sampler)
        assert len(batches) == len(sampler) == 4  # constant per epoch (random: 24 // 6)
        seen[epoch] = sampler.bag_size
        rows = [r for batch in batches for r, _ in batch]
        assert len(rows) == len(set(rows))  # each image at most once per epoch
        if sampler.bag_size:
            for batch in batches:
                groups = {}
                for row, bag_id in batch:
                    groups.setdefault(bag_id, []).append(row)
                assert all(g in bags[sampler.bag_size] for g in groups.values())
    assert seen == {0: 0, 1: 3, 2: 5, 3: 5}  # the last size repeats
    assert parse_bag_schedule(None) == [0]
    with pytest.raises(ValueError, match="no training bags"):
        BagBatchSampler(N_IMAGES, 6, {3: bags_of(3)}, [7])
    with pytest.raises(ValueError):
        parse_bag_schedule("1")


def test_curriculum_changes_bag_size_at_epoch_boundaries_in_training(tmp_path, sr_data, judge, tokenizer):
    model, processor = tiny.build_tiny_clipcap(tokenizer)
    seen = []

    def recorder(completions, cocoid, bag_id, trainer_state, **kw):
        seen.append((trainer_state.global_step, len(set(bag_id)), len(cocoid)))
        return [0.0] * len(completions)

    args = sr_config(tmp_path, bag_schedule="0,3", num_train_epochs=2, learning_rate=0.0)
    trainer = SRTrainer(model, [recorder], args=args, train_dataset=sr_data, processing_class=processor,
                        train_bags={3: bags_of(3)})
    trainer.train()
    sizes = [h["bags/size"] for h in trainer.state.log_history if "bags/size" in h]
    assert sizes == [0.0] * 4 + [3.0] * 4  # 4 batches per epoch; size 3 from the 2nd epoch
    assert [n_bags for step, n_bags, _ in seen] == [1] * 4 + [2] * 4  # 6 images = 2 bags of 3


# -- learning signal ------------------------------------------------------------------------------


def first_token_probability(model, processor, images, token_id):
    with torch.no_grad():
        pixel_values = processor(images=images)["pixel_values"]
        logits = model(pixel_values=pixel_values).logits[:, -1]
    return torch.softmax(logits / 0.3, -1)[:, token_id].mean().item()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_reward_favouring_a_token_moves_its_probability(tmp_path, sr_data, tokenizer, sign):
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=1)
    target = tokenizer.convert_tokens_to_ids("Ġcircle")
    images = [sr_data[i]["image"] for i in range(N_IMAGES)]
    before = first_token_probability(model, processor, images, target)

    def likes_circle(completions, completion_ids, **kw):
        return [sign * float(target in ids) for ids in completion_ids]

    args = sr_config(tmp_path, max_steps=12, learning_rate=3e-3, temperature=1.0, baseline="rloo", num_generations=4,
                     max_new_tokens=4)
    SRTrainer(model, likes_circle, args=args, train_dataset=sr_data, processing_class=processor).train()
    after = first_token_probability(model, processor, images, target)
    assert (after - before) * sign > 0.2 * before, (before, after)


# -- parameter-efficient modes --------------------------------------------------------------------


def trained_parameters(tmp_path, tokenizer, data, judge, modules):
    """(names of parameters that changed in 2 SR steps, all parameter names)."""
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=2)
    args = sr_config(tmp_path / modules, max_steps=2, learning_rate=1e-2, lora_init="peft")
    trainer = SRTrainer(model, [SelfRetrievalReward(judge)], args=args, train_dataset=data, processing_class=processor,
                        peft_config=sr_lora_config(modules, rank=4))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    changed = {k for k, v in trainer.model.named_parameters() if not torch.equal(v.detach(), before[k])}
    return changed, set(before)


@pytest.mark.parametrize("modules", ["L", "V", "LV"])
def test_lora_modes_train_exactly_the_intended_parameters(tmp_path, tokenizer, sr_data, judge, modules):
    judge_params = [p.detach().clone() for p in judge.model.parameters()]
    changed, names = trained_parameters(tmp_path, tokenizer, sr_data, judge, modules)
    lora_lm = {n for n in names if "lora_" in n and "language_model" in n}
    lora_vision = {n for n in names if "lora_" in n and "vision_model" in n}
    mapper = {n for n in names if "mapper" in n and "modules_to_save" in n}
    assert mapper and mapper <= changed  # the mapper trains in full in every mode
    assert bool(lora_lm) == ("L" in modules) and bool(lora_vision) == ("V" in modules)
    lora_b = {n for n in lora_lm | lora_vision if "lora_B" in n}
    assert lora_b and lora_b <= changed  # every adapter learned something
    frozen_base = {n for n in names if "lora_" not in n and "modules_to_save" not in n}
    assert not (changed & frozen_base), sorted(changed & frozen_base)[:5]
    assert changed <= lora_lm | lora_vision | mapper
    assert all(torch.equal(a, b) for a, b in zip(judge_params, judge.model.parameters()))  # judge never trains


# -- guards and resume ------------------------------------------------------------------------------


def test_nonfinite_reward_and_loss_skip_the_update(tmp_path, tokenizer, sr_data):
    model, processor = tiny.build_tiny_clipcap(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def huge(completions, **kw):  # finite rewards whose loss overflows float32
        return [3e38] * len(completions)

    args = sr_config(tmp_path, max_steps=2)
    trainer = SRTrainer(model, huge, args=args, train_dataset=sr_data, processing_class=processor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.skipped_updates == 2
    assert any("non-finite SR loss" in str(w.message) for w in caught)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    model, processor = tiny.build_tiny_clipcap(tokenizer)

    def some_inf(completions, **kw):
        return [float("inf")] + [0.5] * (len(completions) - 1)

    trainer = SRTrainer(model, some_inf, args=sr_config(tmp_path / "b", max_steps=1), train_dataset=sr_data,
                        processing_class=processor)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.nonfinite_rewards == 1 and trainer.skipped_updates == 0  # one caption left out, still an update


def run_sr(tmp_path, tokenizer, data, judge, max_steps, resume=None, save_steps=2):
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=4)
    args = sr_config(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=save_steps,
                     bag_schedule="0,3", learning_rate=5e-3, num_train_epochs=3, lora_init="peft")
    trainer = SRTrainer(model, [SelfRetrievalReward(judge)], args=args, train_dataset=data,
                        processing_class=processor, train_bags={3: bags_of(3)}, peft_config=sr_lora_config("LV", rank=4))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_matches_uninterrupted_run(tmp_path, tokenizer, sr_data, judge):
    full = run_sr(tmp_path / "full", tokenizer, sr_data, judge, max_steps=6)
    full_params = {k: v.detach().clone() for k, v in full.model.named_parameters()}
    assert full.baseline.count == 6
    # training did something: LoRA B matrices start at zero, the mapper starts at its initial weights
    assert any(v.abs().sum() > 0 for k, v in full_params.items() if "lora_B" in k)
    initial = tiny.build_tiny_clipcap(tokenizer, seed=4)[0].mapper.model[0].weight
    trained = next(v for k, v in full_params.items() if "modules_to_save" in k and k.endswith("model.0.weight"))
    assert not torch.allclose(initial, trained)
    # stop after 2 steps (mid-epoch) and after 4 (epoch boundary, bag size changes), resume each
    for stop in (2, 4):
        run_sr(tmp_path / f"part{stop}", tokenizer, sr_data, judge, max_steps=stop, save_steps=stop)
        resumed = run_sr(tmp_path / f"part{stop}", tokenizer, sr_data, judge, max_steps=6,
                         resume=str(tmp_path / f"part{stop}" / "out" / f"checkpoint-{stop}"))
        assert resumed.baseline.state_dict() == pytest.approx(full.baseline.state_dict())
        for name, value in resumed.model.named_parameters():
            torch.testing.assert_close(value.detach(), full_params[name], rtol=1e-5, atol=1e-6, msg=name)


def test_evaluate_reports_bag_r1_and_cider(tmp_path, tokenizer, sr_data, judge):
    model, processor = tiny.build_tiny_clipcap(tokenizer)
    trainer = SRTrainer(model, [SelfRetrievalReward(judge)], args=sr_config(tmp_path), train_dataset=sr_data,
                        eval_dataset=sr_data.select(range(9)), eval_bags=bags_of(3, 9), processing_class=processor,
                        eval_judge=judge)
    metrics = trainer.evaluate()
    # recompute R@1 by hand from the same captions
    captions = trainer.caption(sr_data.select(range(9)))
    text = judge.embed_texts(captions)
    image = judge.embed_images([sr_data[i]["image"] for i in range(9)])
    sims = text @ image.T
    correct = [sims[i, i] > max(sims[i, j] for j in range(b, b + 3) if j != i)
               for b in (0, 3, 6) for i in range(b, b + 3)]
    assert metrics["eval_r1_bags"] == pytest.approx(100 * sum(map(bool, correct)) / 9, abs=1e-6)
    assert 0 <= metrics["eval_cider"] and metrics["eval_mean_words"] > 0


def test_periodic_evaluation_selects_the_best_checkpoint(tmp_path, tokenizer, sr_data, judge):
    model, processor = tiny.build_tiny_clipcap(tokenizer)
    args = sr_config(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                     metric_for_best_model="eval_r1_bags", greater_is_better=True, load_best_model_at_end=True)
    trainer = SRTrainer(model, [SelfRetrievalReward(judge)], args=args, train_dataset=sr_data,
                        eval_dataset=sr_data.select(range(9)), eval_bags=bags_of(3, 9), processing_class=processor,
                        eval_judge=judge)
    trainer.train()
    evals = {h["step"]: h["eval_r1_bags"] for h in trainer.state.log_history if "eval_r1_bags" in h}
    assert sorted(evals) == [2, 4]
    best_step = max(evals, key=lambda s: (evals[s], -s))  # ties keep the earlier checkpoint
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert trainer.state.best_metric == pytest.approx(evals[best_step])
