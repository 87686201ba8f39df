"""SRTrainer as TRL users expect it and as a hostile user tries it: reward inputs cut as GRPO cuts
them, TRL's own reward functions, async rewards, errors that name the function, None vs NaN
rewards, `peft_config` applied exactly as given, model loading options, seeding before LoRA, and
checkpoints that survive a SIGKILL at any moment of a save."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests import tiny
from trainers import SRTrainer, last_complete_checkpoint, sr_lora_config

ROOT = Path(__file__).resolve().parents[1]


config = tiny.sr_config


@pytest.fixture(scope="module")
def data():
    return tiny.caption_dataset(12)


def grpo_cut(ids: torch.Tensor, eos_token_ids) -> list[list[int]]:
    """How TRL's GRPOTrainer turns generated ids into `completion_ids` (grpo_trainer.py, trl 1.16:
    "Mask everything after the first EOS token")."""
    is_eos = torch.isin(ids, torch.tensor(eos_token_ids))
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    mask = torch.arange(is_eos.size(1)).expand(is_eos.size(0), -1) <= eos_idx.unsqueeze(1)
    return [c[m].tolist() for c, m in zip(ids, mask)]


def fixed_generate(trainer, rows):
    """Replace sampling by fixed token rows (padded with the pad token after a stop)."""
    ids = torch.tensor(rows)

    def generate(vision, **kw):
        n = next(iter(vision.values())).shape[0] * kw.get("num_return_sequences", 1)
        return ids[:n]

    trainer._generate = generate
    return ids


# -- TRL conventions ------------------------------------------------------------------------------


def test_trl_reward_functions_get_completions_cut_as_grpo_does(tmp_path, tokenizer, data):
    from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment

    model, processor = tiny.build_tiny_clipcap(tokenizer)
    stop = model.generation_config.eos_token_id
    stop = stop if isinstance(stop, list) else [stop]
    pad, word, dot = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("Ġcircle"), stop[-1]
    assert dot != pad
    rows = [[word, word, word, word, word, word],  # never stops: 6 tokens
            [word, dot, pad, pad, pad, pad],  # 2 tokens
            [word, word, word, word, word, dot],  # 6
            [word, word, dot, pad, pad, pad],  # 3
            [word, word, word, word, dot, pad],  # 5
            [dot, pad, pad, pad, pad, pad]]  # 1
    overlong = get_soft_overlong_punishment(max_completion_len=5, soft_punish_cache=4)
    repetition = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    seen = []

    def recorder(completions, completion_ids, **kw):
        seen.append(completion_ids)
        return [0.0] * len(completions)

    trainer = SRTrainer(model, [overlong, repetition, recorder], args=config(tmp_path, max_steps=1),
                        train_dataset=data, processing_class=processor)
    ids = fixed_generate(trainer, rows)
    captions, cut, _ = trainer._decode(ids)
    rewards, given = trainer._score(captions, cut, {"cocoid": list(range(6))})
    expected_ids = grpo_cut(ids, trainer.stop_ids)
    assert [len(c) for c in expected_ids] == [6, 2, 6, 3, 5, 1]
    assert seen[-1] == expected_ids  # exactly what GRPOTrainer would pass
    assert rewards[:, 0].tolist() == overlong(expected_ids) == [-1.0, -0.25, -1.0, -0.5, -1.0, 0.0]
    assert rewards[:, 1].tolist() == pytest.approx(repetition(expected_ids))
    assert overlong([r for r in rows]) == [-1.0] * 6  # what the padded rows would have given
    assert bool(given.all())


def test_async_reward_functions_run_and_combine(tmp_path, tokenizer, data):
    model, processor = tiny.build_tiny_clipcap(tokenizer)

    async def async_len(completions, completion_ids, **kw):
        import asyncio

        await asyncio.sleep(0)
        return [float(len(c)) for c in completion_ids]

    class AsyncConst:
        __name__ = "async_const"

        async def __call__(self, completions, **kw):
            return [2.0] * len(completions)

    args = config(tmp_path, max_steps=1, reward_weights=[1.0, 0.5])
    trainer = SRTrainer(model, [async_len, AsyncConst()], args=args, train_dataset=data, processing_class=processor)
    assert trainer.reward_names == ["async_len", "async_const"]
    ids = fixed_generate(trainer, [[5, 6, 7, 8, 9, 10]] * 6)
    captions, cut, _ = trainer._decode(ids)
    rewards, given = trainer._score(captions, cut, {"cocoid": list(range(6))})
    assert rewards.tolist() == [[6.0, 2.0]] * 6 and bool(given.all())
    assert trainer._combine(rewards, given).tolist() == [7.0] * 6
    trainer.train()  # a whole step with async rewards
    assert trainer.state.log_history[0]["rewards/async_const/mean"] == 2.0


def test_a_failing_reward_function_is_named_with_the_step(tmp_path, tokenizer, data):
    model, processor = tiny.build_tiny_clipcap(tokenizer)

    def broken_reward(completions, **kw):
        raise ZeroDivisionError("division by zero")

    trainer = SRTrainer(model, [broken_reward], args=config(tmp_path, max_steps=1), train_dataset=data,
                        processing_class=processor)
    with pytest.raises(RuntimeError, match=r"'broken_reward' failed at step 0: division by zero") as info:
        trainer.train()
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# -- None vs NaN ---------------------------------------------------------------------------------


def test_none_is_no_reward_but_nan_leaves_the_caption_out(tmp_path, tokenizer, data):
    model, processor = tiny.build_tiny_clipcap(tokenizer)

    def sometimes_none(completions, **kw):
        return [None, 1.0, 1.0, None, 1.0, 1.0]

    def sometimes_nan(completions, **kw):
        return [2.0, math.nan, 2.0, 2.0, math.inf, 2.0]

    trainer = SRTrainer(model, [sometimes_none, sometimes_nan], args=config(tmp_path, max_steps=1),
                        train_dataset=data, processing_class=processor)
    captions, cut, _ = trainer._decode(fixed_generate(trainer, [[5, 6, 7]] * 6))
    combined = trainer._combine(*trainer._score(captions, cut, {"cocoid": list(range(6))}))
    assert combined[[0, 2, 3, 5]].tolist() == [2.0, 3.0, 2.0, 3.0]  # None: scored by the other function
    assert not torch.isfinite(combined[[1, 4]]).any()  # NaN / inf: not silently scored by the other one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.nonfinite_rewards == 2
    assert any("NaN/inf reward from ['sometimes_nan']" in str(w.message) for w in caught)
    log = trainer.state.log_history[0]
    assert log["rewards/nonfinite"] == 2.0 and log["nonfinite_rewards_total"] == 2.0


def test_all_nan_rewards_train_nothing_and_say_so(tmp_path, tokenizer, data):
    model, processor = tiny.build_tiny_clipcap(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SRTrainer(model, [lambda completions, **kw: [math.nan] * len(completions)],
                        args=config(tmp_path, max_steps=2, weight_decay=0.01), train_dataset=data,
                        processing_class=processor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.nonfinite_rewards == 12 and trainer.skipped_updates == 2
    assert any("no caption with a finite reward" in str(w.message) for w in caught)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # not even weight decay


# -- peft_config and model loading -----------------------------------------------------------------


def test_peft_config_is_applied_exactly_as_given(tmp_path, tokenizer, data):
    model, processor = tiny.build_tiny_clipcap(tokenizer)
    full = SRTrainer(model, [lambda completions, **kw: [0.0] * len(completions)], args=config(tmp_path),
                     train_dataset=data, processing_class=processor)  # peft_config=None: no adapters
    names = [n for n, _ in full.model.named_parameters()]
    assert not any("lora" in n for n in names)
    assert all(p.requires_grad for n, p in full.model.named_parameters() if "language_model" in n)
    assert not full.vision_trainable  # the vision tower stays frozen (config.freeze_vision)
    lora = SRTrainer(tiny.build_tiny_clipcap(tokenizer)[0], [lambda completions, **kw: [0.0] * len(completions)],
                     args=config(tmp_path / "v"), train_dataset=data, processing_class=processor,
                     peft_config=sr_lora_config("V", rank=2))
    assert lora.vision_trainable
    assert {n.split(".lora_")[0].split(".")[-1] for n, _ in lora.model.named_parameters() if "lora_A" in n} == {
        "q_proj", "k_proj", "v_proj", "fc1", "fc2"}


def test_model_by_name_uses_model_init_kwargs(tmp_path, tokenizer, tiny_clipcap_dir, data):
    processor = tiny.build_tiny_clipcap(tokenizer)[1]
    trainer = SRTrainer(str(tiny_clipcap_dir), [lambda completions, **kw: [0.0] * len(completions)],
                        args=config(tmp_path, model_init_kwargs='{"dtype": "bfloat16"}'), processing_class=processor)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}


def test_seed_is_applied_before_the_adapters_are_created(tmp_path, tokenizer, data, tiny_clip_judge_dir):
    """Two runs with the same --seed end bit-equal in LV mode, whatever the RNG state before."""
    import datasets

    import train_sr

    coco = tmp_path / "coco"
    datasets.DatasetDict({"train": data}).save_to_disk(coco)
    model_dir = tiny.save_tiny_clipcap(tmp_path / "model", tokenizer, seed=3)
    finals = []
    for run, noise in (("a", 1), ("b", 2)):
        torch.manual_seed(noise)  # a different global RNG state before each run
        torch.rand(noise * 7)
        out = tmp_path / run
        train_sr.main(["--model", str(model_dir), "--dataset", str(coco), "--judge", str(tiny_clip_judge_dir),
                       "--bag_schedule", "rand", "--per_device_train_batch_size", "6", "--max_steps", "2",
                       "--max_new_tokens", "4", "--learning_rate", "1e-2", "--lora_rank", "4", "--seed", "0",
                       "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--output_dir", str(out)])
        from safetensors.torch import load_file

        finals.append(load_file(str(out / "model.safetensors")))
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    start = tiny.save_tiny_clipcap(tmp_path / "start", tokenizer, seed=3)
    from safetensors.torch import load_file

    initial = load_file(str(start / "model.safetensors"))
    assert any(not torch.equal(initial[k], finals[0][k]) for k in finals[0] if "language_model" in k)  # it trained


# -- checkpoints that survive a SIGKILL --------------------------------------------------------------


def _run(out: Path, resume: bool = False, kill_when=None, timeout: float = 180.0):
    """Run tests/sr_checkpoint_script.py; with `kill_when(out) -> bool`, SIGKILL it once that holds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tests" / "sr_checkpoint_script.py"), str(out), *(["--resume"] if resume else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    killed = False
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd} did not finish in {timeout} s")
            if kill_when is not None and kill_when(out / "run"):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.001)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if not killed:
        assert proc.returncode == 0, err[-3000:]
    return killed


def _appears(name: str):
    return lambda run: (run / "checkpoint-4" / name).exists() if name else (run / "checkpoint-4").exists()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("uninterrupted")
    _run(out)
    return load_file(str(out / "final.safetensors"))


@pytest.mark.parametrize("phase,trigger", [
    ("before the weights", ""),  # the folder appears: nothing or part of the weights written
    ("during the weights and optimizer", "adapter_model.safetensors"),
    ("during rotation", "trainer_state.json"),  # state written: checkpoint-2 is deleted next
])
def test_a_kill_at_any_phase_of_a_save_resumes_to_the_same_weights(tmp_path, uninterrupted, phase, trigger):
    from safetensors.torch import load_file

    killed = _run(tmp_path, kill_when=_appears(trigger))
    assert killed, f"the run finished before the kill ({phase})"
    assert last_complete_checkpoint(tmp_path / "run") is not None  # something complete to resume from
    _run(tmp_path, resume=True)
    resumed = load_file(str(tmp_path / "final.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-5, msg=name)


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    state = {"stateful_callbacks": {"SRStateCallback": {"args": {}, "attributes": {"sr_state": {"baseline": {}}}}}}
    for step, content in ((2, json.dumps(state)), (4, json.dumps(state)), (6, '{"stateful_call')):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(content)
    (run / "checkpoint-8").mkdir()  # killed before anything was written
    assert last_complete_checkpoint(run) == str(run / "checkpoint-4")
    assert last_complete_checkpoint(tmp_path / "empty") is None


# -- sharded training: sampling runs on gathered weights ---------------------------------------------


def test_generation_gathers_deepspeed_zero3_parameters(tmp_path, tokenizer, data, monkeypatch):
    """DeepSpeed is not installed here: a stub `deepspeed.zero.GatheredParameters` records that
    SRTrainer's sampling runs inside the ZeRO-3 gather of trl's `unwrap_model_for_generation`."""
    import contextlib
    import types

    from trl.distributed import DistributedBackend

    events = []

    @contextlib.contextmanager
    def gathered(params, *args, **kwargs):
        events.append(("gather", len(list(params))))
        yield
        events.append(("release", None))

    model, processor = tiny.build_tiny_clipcap(tokenizer)
    trainer = SRTrainer(model, [lambda completions, **kw: [1.0] * len(completions)], args=config(tmp_path),
                        train_dataset=data, processing_class=processor)
    import importlib.machinery

    stub = types.ModuleType("deepspeed")
    stub.__spec__ = importlib.machinery.ModuleSpec("deepspeed", loader=None)  # not "installed": no metadata
    stub.zero = types.SimpleNamespace(GatheredParameters=gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", stub)
    monkeypatch.setattr(DistributedBackend, "is_zero3", property(lambda self: True))
    original = trainer.model.generate

    def generate(**kw):
        events.append(("generate", None))
        return original(**kw)

    monkeypatch.setattr(trainer.model, "generate", generate)
    batch = trainer.data_collator([dict(data[i], bag_id=0) for i in range(3)])
    trainer._prepare_inputs(batch)
    assert events == [("gather", len(list(model.parameters()))), ("generate", None), ("release", None)]


def test_generation_summons_full_fsdp1_parameters(tmp_path, tokenizer, data, monkeypatch):
    """accelerate 1.15 never selects FSDP on CPU processes (torch's FSDP2 itself runs on gloo), so an
    FSDP run needs GPUs: a stub `FSDP.summon_full_params` records that sampling runs inside it."""
    import contextlib

    from torch.distributed.fsdp import FullyShardedDataParallel

    events = []

    @contextlib.contextmanager
    def summon(module, **kwargs):
        events.append(("summon", kwargs.get("recurse")))
        yield
        events.append(("release", None))

    model, processor = tiny.build_tiny_clipcap(tokenizer)
    trainer = SRTrainer(model, [lambda completions, **kw: [1.0] * len(completions)], args=config(tmp_path),
                        train_dataset=data, processing_class=processor)
    monkeypatch.setattr(FullyShardedDataParallel, "summon_full_params", staticmethod(summon))
    monkeypatch.setattr(trainer._dist, "fsdp_version", 1)
    original = trainer.model.generate

    def generate(**kw):
        events.append(("generate", None))
        return original(**kw)

    monkeypatch.setattr(trainer.model, "generate", generate)
    trainer._prepare_inputs(trainer.data_collator([dict(data[i], bag_id=0) for i in range(3)]))
    assert events == [("summon", False), ("generate", None), ("release", None)]


# -- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "0"], "temperature must be > 0"),
    (["--bag_schedule", "3:2,x:3"], "last_epoch:size"),
    (["--lora_modules", "X"], "--lora_modules 'X'"),
    (["--rewards", "sr", "bleu"], "use sr and/or cider"),
    (["--cider_df", "weekly"], "use corpus or batch"),
])
def test_bad_train_sr_arguments_are_one_error_line(tmp_path, capsys, flags, message):
    import train_sr

    with pytest.raises(SystemExit) as info:
        train_sr.main(["--model", "m", "--dataset", "d", "--output_dir", str(tmp_path), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train_sr.py: error:") or "error:" in err[-1]
    assert message in err[-1]
