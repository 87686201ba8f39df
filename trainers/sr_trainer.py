"""Self-retrieval REINFORCE fine-tuning of ClipCap (NDLB Sec. 4.1, 4.5-4.8; App. B.2-B.3, C.1-C.4).

One training step, per micro-batch of whole bags (``BagBatchSampler``):

1. sample captions with ``model.generate`` (temperature 0.3 over the full vocabulary, the model's
   40-token limit, stop after a token containing ".") — no gradients;
2. score them with the reward functions (TRL convention: ``completion_ids`` cut after the first
   stop token), combine with ``reward_weights``;
3. subtract a baseline (running mean / greedy / leave-one-out);
4. recompute the captions' log-probabilities under the same tempered distribution in one
   teacher-forced forward pass, and minimise ``-(R - b) * log p(c | i)`` (token log-probs
   averaged over the caption, as the authors do, or summed).

The shape follows TRL's RLOO/GRPO trainers: a ``Trainer`` subclass overriding
``get_train_dataloader``, ``_prepare_inputs``, ``compute_loss``, ``training_step``, ``evaluate``
and ``log``, so ``accelerate launch`` (DDP, FSDP, DeepSpeed: generation runs on the gathered
weights, as TRL's ``unwrap_model_for_generation``), checkpointing, resumption, ``report_to`` and
callbacks work as usual. LoRA (SR-L/SR-V/SR-LV) goes through ``peft``: the trainer applies exactly
the ``peft_config`` it is given.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging
from trl.distributed import DistributedBackend
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import (
    disable_dropout_in_model,
    entropy_from_logits,
    get_callable_name,
    is_async_callable,
    selective_log_softmax,
    shutdown_event_loop_in_daemon,
    start_event_loop_in_daemon,
)

from metrics.clip_judge import ClipJudge, retrieval_scores, similarity

from .bags import BagBatchSampler, BagCollator, BagCurriculumCallback, BagView, parse_bag_schedule
from .baselines import GreedyBaseline, build_baseline
from .lora import init_lora_as_authors
from .rewards import CiderReward
from .sr_config import SRConfig

logger = logging.get_logger(__name__)

RewardFunc = Callable[..., list[float | None]]
TRAINER_STATE_NAME = "trainer_state.json"
LEGACY_SR_STATE_NAME = "sr_state.json"  # written by earlier versions beside trainer_state.json


@contextlib.contextmanager
def _cache_frozen_weight_casts(model: torch.nn.Module, enabled: bool = True):
    """Inside an autocast region, let torch reuse the bf16 copy of the frozen weights.

    torch's autocast caches the low-precision cast of a weight for the whole region only when the
    weight is a leaf that requires grad; frozen weights (all of GPT-2 and CLIP in the LoRA modes)
    are otherwise cast again at every decoding step, which made bf16 sampling slower than float32
    (measured in `benchmarks/bench_sr_step.py`). Under `torch.no_grad()` (sampling) flagging them
    for the region changes no value and computes no gradient; the flags are restored on exit.
    """
    frozen = [p for p in model.parameters() if enabled and p.is_floating_point() and not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def completion_mask(ids: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """1 for each caption token up to and including the first stop token, 0 after (padding).

    ids: (n, T) generated tokens → (n, T) float mask.
    """
    is_stop = torch.isin(ids, torch.tensor(list(stop_ids), device=ids.device))  # (n, T)
    stopped_before = (is_stop.cumsum(1) - is_stop.long()) > 0  # a stop token occurred earlier
    return (~stopped_before).float()


class SRStateCallback(TrainerCallback, ExportableState):
    """Carries the SR state (baseline, curriculum, counters) in ``trainer_state.json``.

    The Trainer writes its state file last in a checkpoint, after the weights, optimizer and RNG
    states and before it deletes older checkpoints, so a checkpoint whose ``trainer_state.json``
    holds this state is complete, and a kill at any moment of a save leaves one to resume from.
    """

    def __init__(self, trainer: "SRTrainer | None" = None):
        self.trainer = trainer

    def state(self) -> dict:
        return {"args": {}, "attributes": {"sr_state": self.trainer.sr_state() if self.trainer else {}}}


def read_sr_state(checkpoint: str | os.PathLike) -> dict | None:
    """The SR state saved in a checkpoint, or None when the checkpoint has none (or is incomplete)."""
    path = Path(checkpoint) / TRAINER_STATE_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    sr = state.get("stateful_callbacks", {}).get(SRStateCallback.__name__)
    if isinstance(sr, list):
        sr = sr[-1] if sr else None
    if sr and sr.get("attributes", {}).get("sr_state"):
        return sr["attributes"]["sr_state"]
    legacy = Path(checkpoint) / LEGACY_SR_STATE_NAME
    try:
        return json.loads(legacy.read_text())
    except (OSError, ValueError):
        return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` of ``output_dir`` that holds a complete SR checkpoint (its
    ``trainer_state.json`` parses and carries the SR state); newer incomplete ones are reported."""
    folders = []
    for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match and path.is_dir():
            folders.append((int(match.group(1)), path))
    for _, path in sorted(folders, reverse=True):
        if read_sr_state(path) is not None:
            return str(path)
        logger.warning("%s is incomplete (interrupted while saving?); resuming from an earlier checkpoint", path)
    return None


class SRTrainer(Trainer):
    """Trainer for self-retrieval (SR) fine-tuning with REINFORCE.

    Args:
        model: a `ClipCapForCaptioning` (MLE pre-trained) or a path/Hub id to load one from (with
            `args.model_init_kwargs`).
        reward_funcs: one reward function or a list (TRL calling convention, see
            `trainers.rewards`; `async def` functions run concurrently on an event loop), e.g.
            `[SelfRetrievalReward(judge), CiderReward(train_refs)]`.
        args: an `SRConfig`.
        train_dataset: rows with an image column (`image`), an id column (`cocoid`) and any
            columns the reward functions read (`captions` for CIDEr).
        processing_class: the `ClipCapProcessor`.
        train_bags: `{bag size: [[row, ...], ...]}` training bags (rows of `train_dataset`), needed
            for every size of `args.bag_schedule`.
        eval_dataset / eval_bags: held-out images and bags (lists of rows) for periodic evaluation
            (R@1 by `eval_judge` among random batches and on the bags, CIDEr-D against the
            `captions` column).
        eval_judge: the judge that scores R@1 in evaluation (passed explicitly; without one,
            evaluation reports CIDEr-D and caption length only).
        peft_config: the LoRA config to apply (e.g. `trainers.sr_lora_config("LV")`, the paper's
            SR-LV); None trains the model as given. Adapters start as `args.lora_init` says.
    """

    _tag_names = ["ndlb", "self-retrieval", "clipcap"]

    def __init__(
        self,
        model,
        reward_funcs: RewardFunc | list[RewardFunc],
        args: SRConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        train_bags: Mapping[int, Sequence[Sequence[int]]] | None = None,
        eval_bags: Sequence[Sequence[int]] | None = None,
        eval_judge: ClipJudge | None = None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = args or SRConfig(output_dir="sr-output")
        # Seed before anything random is initialised (LoRA adapters), as Trainer seeds model_init.
        from transformers.trainer_utils import enable_full_determinism, set_seed

        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        if isinstance(model, str):
            model = self._load_model(model, args.model_init_kwargs)
        if processing_class is None:
            raise ValueError("SRTrainer needs the ClipCapProcessor as `processing_class`.")
        self.base_config = model.config
        if args.disable_dropout:
            disable_dropout_in_model(model)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
            if args.lora_init == "authors":
                init_lora_as_authors(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.vision_trainable = any(p.requires_grad for p in base.vision_model.parameters())

        self.reward_funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        self.reward_names = [get_callable_name(f) for f in self.reward_funcs]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"{len(weights)} reward weights for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self._async_loop = None
        if any(is_async_callable(f) for f in self.reward_funcs):
            thread, self._async_loop, ready = start_event_loop_in_daemon(name="SRTrainer-rewards")
            ready.wait()
            atexit.register(shutdown_event_loop_in_daemon, thread, self._async_loop)
        baseline = args.baseline
        if baseline == "auto":
            baseline = "greedy" if any(isinstance(f, CiderReward) for f in self.reward_funcs) else "mean"
        self.baseline = build_baseline(baseline, args.num_generations)

        generation = model.generation_config
        self.stop_ids = sorted(set(generation.eos_token_id if isinstance(generation.eos_token_id, list)
                                   else [generation.eos_token_id]) - {None})
        self.max_new_tokens = args.max_new_tokens or generation.max_new_tokens or 40

        self.eval_bags = [list(b) for b in eval_bags] if eval_bags is not None else None
        self.eval_judge = eval_judge
        self.bag_sampler = None
        callbacks = [*(callbacks or []), SRStateCallback(self)]
        if train_dataset is not None:
            self.bag_sampler = BagBatchSampler(len(train_dataset), args.per_device_train_batch_size, train_bags,
                                               parse_bag_schedule(args.bag_schedule), seed=args.seed)
            callbacks.append(BagCurriculumCallback(self.bag_sampler))
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.nonfinite_rewards = 0  # captions left out of an update because a reward was NaN / inf
        self.skipped_updates = 0  # micro-batches whose loss was not finite

        super().__init__(
            model=model,
            args=args,
            data_collator=BagCollator(processing_class),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._dist = DistributedBackend(self.accelerator)

    @staticmethod
    def _load_model(name_or_path: str, init_kwargs: dict | None):
        from modeling_clipcap import ClipCapForCaptioning

        kwargs = dict(init_kwargs or {})
        dtype = kwargs.get("dtype")
        if isinstance(dtype, str) and dtype != "auto":
            kwargs["dtype"] = getattr(torch, dtype)
        return ClipCapForCaptioning.from_pretrained(name_or_path, **kwargs)

    def get_decay_parameter_names(self, model) -> list[str]:
        """Every parameter gets AdamW's weight decay, as the authors' ``torch.optim.AdamW(sender.parameters())``
        (``finetuning/train.py``); transformers would exempt biases and LayerNorm weights."""
        return [name for name, _ in model.named_parameters()]

    # -- data ------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("SRTrainer: training requires a train_dataset.")
        loader = DataLoader(
            BagView(self.train_dataset),
            batch_sampler=self.bag_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    # -- rewards ---------------------------------------------------------------------------------

    def _log_metric(self, name: str, value: float) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(float(value))

    def _score(self, captions: list[str], completion_ids: list[list[int]],
               columns: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of each caption by each function, called as TRL's GRPOTrainer calls them.

        Returns ``(rewards, given)``: (n, F) float rewards (0 where not given) and (n, F) bool,
        False where a function returned None ("no reward from this function").
        """
        n, step = len(captions), self.state.global_step
        kwargs = dict(prompts=[""] * n, completions=captions, completion_ids=completion_ids,
                      trainer_state=self.state, log_metric=self._log_metric, log_extra=lambda *a, **k: None,
                      **columns)
        outputs: dict[int, list] = {}
        pending = []
        for j, func in enumerate(self.reward_funcs):
            if is_async_callable(func):
                pending.append(j)
                continue
            try:
                outputs[j] = func(**kwargs)
            except Exception as error:
                raise RuntimeError(f"reward function {self.reward_names[j]!r} failed at step {step}: {error}") from error
        if pending:
            import asyncio

            async def run_all():
                return await asyncio.gather(*(self.reward_funcs[j](**kwargs) for j in pending), return_exceptions=True)

            for j, result in zip(pending, asyncio.run_coroutine_threadsafe(run_all(), self._async_loop).result()):
                if isinstance(result, BaseException):
                    raise RuntimeError(f"reward function {self.reward_names[j]!r} failed at step {step}: "
                                       f"{result}") from result
                outputs[j] = result
        rewards = torch.zeros(n, len(self.reward_funcs))
        given = torch.zeros(n, len(self.reward_funcs), dtype=torch.bool)
        for j, values in outputs.items():
            values = list(values)
            if len(values) != n:
                raise ValueError(f"reward function {self.reward_names[j]!r} returned {len(values)} rewards "
                                 f"for {n} captions at step {step}")
            for i, v in enumerate(values):
                if v is not None:
                    rewards[i, j], given[i, j] = float(v), True
        return rewards, given

    def _combine(self, rewards: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the given rewards per caption; NaN when no function gave one, and
        non-finite when a given reward is NaN / inf."""
        combined = (torch.where(given, rewards, 0.0) * self.reward_weights).sum(1)
        combined[~given.any(1)] = math.nan
        return combined

    # -- one step ----------------------------------------------------------------------------------

    def _generate(self, vision: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        """``model.generate`` on the full weights (gathered under DeepSpeed ZeRO-3 / FSDP), in bf16
        autocast under ``--bf16``."""
        with (
            unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                        gather_deepspeed3_params=self.args.ds3_gather_for_generation) as unwrapped,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
            self.accelerator.autocast(),  # --bf16: one autocast region, weights cast once per call
            _cache_frozen_weight_casts(unwrapped, enabled=self.args.bf16),
        ):
            return unwrapped.generate(**vision, max_new_tokens=self.max_new_tokens, **kwargs)

    def _decode(self, ids: torch.Tensor) -> tuple[list[str], list[list[int]], torch.Tensor]:
        """Captions, completion ids cut after the first stop token (as TRL passes them), mask."""
        mask = completion_mask(ids, self.stop_ids)
        cut = [row[m].tolist() for row, m in zip(ids.cpu(), mask.bool().cpu())]
        return self.processing_class.batch_decode(cut), cut, mask

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Sample captions, score them and compute advantages (no gradients)."""
        device = self.accelerator.device
        k = self.args.num_generations
        pixel_values = inputs["pixel_values"].to(device)
        columns = {key: value for key, value in inputs.items() if key != "pixel_values"}
        start = time.perf_counter()
        with torch.no_grad(), self.accelerator.autocast():  # --bf16: the CLIP pass in bf16 too
            unwrapped = self.accelerator.unwrap_model(self.model)
            vision = {"image_embeds": unwrapped.get_image_embeds(pixel_values).float()}  # (B, clip_dim)
        ids = self._generate(vision, do_sample=True, temperature=self.args.temperature, top_k=self.args.top_k or None,
                             top_p=1.0, num_beams=1, num_return_sequences=k)  # (B*k, T)
        greedy_ids = None
        if isinstance(self.baseline, GreedyBaseline):
            greedy_ids = self._generate(vision, do_sample=False, num_beams=1)
        generated = time.perf_counter()
        captions, cut_ids, mask = self._decode(ids)
        repeated = {key: [v for v in value for _ in range(k)] for key, value in columns.items()}
        rewards_per_func, given = self._score(captions, cut_ids, repeated)  # (B*k, F)
        rewards = self._combine(rewards_per_func, given)  # (B*k,)
        if greedy_ids is not None:
            greedy_captions, greedy_cut, _ = self._decode(greedy_ids)
            baseline = self.baseline(rewards, self._combine(*self._score(greedy_captions, greedy_cut, columns)))
        else:
            baseline = self.baseline(rewards)
        self._log_metric("timing/generate_s", generated - start)
        self._log_metric("timing/reward_s", time.perf_counter() - generated)

        nonfinite = (given & ~torch.isfinite(rewards_per_func)).any(1)
        if nonfinite.any():
            self.nonfinite_rewards += int(nonfinite.sum())
            bad = [self.reward_names[j] for j in range(len(self.reward_funcs))
                   if (given[:, j] & ~torch.isfinite(rewards_per_func[:, j])).any()]
            warnings.warn(f"step {self.state.global_step}: {int(nonfinite.sum())} of {len(captions)} caption(s) got a "
                          f"NaN/inf reward from {bad}; they are left out of this update "
                          f"(total so far: {self.nonfinite_rewards}).")
        if not given.any(1).all():
            warnings.warn(f"step {self.state.global_step}: every reward function returned None for "
                          f"{int((~given.any(1)).sum())} caption(s); they are left out of this update.")
        valid = torch.isfinite(rewards) & torch.isfinite(baseline)
        advantages = torch.where(valid, rewards - baseline, torch.zeros_like(rewards))
        # the running baseline moves with the mean reward of the whole (multi-process) batch
        local_mean = rewards[valid].mean() if valid.any() else torch.tensor(math.nan)
        batch_means = self.accelerator.gather(local_mean.reshape(1).to(device)).float()
        if torch.isfinite(batch_means).any():
            self.baseline.update(batch_means[torch.isfinite(batch_means)].mean().item())

        self._log_rewards(rewards_per_func, given, rewards, baseline, mask, captions, nonfinite)
        prepared = {"completion_ids": ids, "completion_mask": mask.to(device),
                    "advantages": advantages.to(device), "valid": valid.to(device)}
        if self.vision_trainable:
            prepared["pixel_values"] = pixel_values.repeat_interleave(k, 0)
        else:
            prepared["image_embeds"] = vision["image_embeds"].repeat_interleave(k, 0)
        return prepared

    def _log_rewards(self, rewards_per_func, given, rewards, baseline, mask, captions, nonfinite) -> None:
        for j, name in enumerate(self.reward_names):
            values = rewards_per_func[given[:, j], j]
            values = values[torch.isfinite(values)]
            self._log_metric(f"rewards/{name}/mean", values.mean().item() if len(values) else math.nan)
            self._log_metric(f"rewards/{name}/std", values.std().item() if len(values) > 1 else math.nan)
        finite = rewards[torch.isfinite(rewards)]
        self._log_metric("reward", finite.mean().item() if len(finite) else math.nan)
        self._log_metric("reward_std", finite.std().item() if len(finite) > 1 else math.nan)
        self._log_metric("baseline", baseline[torch.isfinite(baseline)].mean().item() if len(baseline) else math.nan)
        self._log_metric("completions/mean_length", mask.sum(1).mean().item())
        words = [w for c in captions for w in c.lower().split()]
        self._log_metric("completions/distinct_words", len(set(words)) / max(1, len(words)))
        self._log_metric("bags/size", float(self.bag_sampler.bag_size if self.bag_sampler else 0))
        self._log_metric("rewards/nonfinite", float(nonfinite.sum()))
        self._log_metric("nonfinite_rewards_total", float(self.nonfinite_rewards))
        self._log_metric("skipped_updates_total", float(self.skipped_updates))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """REINFORCE: ``-(R - b) * log p(c | i)`` summed over `inputs`' captions and divided by
        `num_items_in_batch` (the micro-batch's captions; default: those of `inputs`)."""
        ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        vision = {k: inputs[k] for k in ("pixel_values", "image_embeds") if k in inputs}
        # the last T + 1 positions: the one before the first caption token predicts it; the very
        # last predicts nothing we sampled. Under --bf16 the forward runs in autocast and accelerate
        # returns float32 logits: log-softmax, rewards and the loss stay float32.
        logits = model(**vision, input_ids=ids, attention_mask=mask.long(),
                       logits_to_keep=ids.shape[1] + 1).logits[:, :-1].float()  # (n, T, V)
        # log-probs of the same tempered policy that sampled
        token_logps = selective_log_softmax(logits, ids, temperature=self.args.temperature)  # (n, T)
        caption_logps = (token_logps * mask).sum(1)
        if self.args.logprob_reduction == "mean":
            caption_logps = caption_logps / mask.sum(1).clamp(min=1)
        loss = -(inputs["advantages"] * caption_logps).sum() / max(1, num_items_in_batch or len(ids))
        with torch.no_grad():  # only at the caption's own positions
            self._log_metric("entropy", entropy_from_logits(logits[mask.bool()] / self.args.temperature).mean().item()
                             if mask.any() else math.nan)
        return (loss, logits) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Like `Trainer.training_step`, with the log-probability pass (forward + backward) run over
        chunks of `args.logprob_chunk_size` captions, so memory holds one chunk's logits over the
        vocabulary, not the whole micro-batch's. A chunk whose loss is not finite on any process is
        left out on every process; when no caption of the micro-batch has a finite reward nothing
        runs (no update, not even weight decay). Both are warned and counted."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        device = inputs["advantages"].device
        if not bool(self.accelerator.gather(inputs["valid"].any().float().reshape(1).to(device)).max() > 0):
            self.skipped_updates += 1
            warnings.warn(f"no caption with a finite reward at step {self.state.global_step}: the update is skipped "
                          f"(total skipped: {self.skipped_updates}).")
            return torch.zeros((), device=self.args.device)
        start = time.perf_counter()
        n = len(inputs["completion_ids"])
        size = self.args.logprob_chunk_size or n
        total, skipped = torch.zeros((), device=device), 0
        for first in range(0, n, size):
            chunk = {key: value[first : first + size] for key, value in inputs.items()}
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, chunk, num_items_in_batch=n)
            if not bool(self.accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0):
                skipped += 1
                continue
            self.accelerator.backward(loss / self.current_gradient_accumulation_steps)
            total += loss.detach()
        if skipped:
            self.skipped_updates += 1
            warnings.warn(f"non-finite SR loss at step {self.state.global_step} in {skipped} of "
                          f"{-(-n // size)} chunk(s): their update is skipped (total skipped: {self.skipped_updates}).")
        self._log_metric("timing/logprob_fwd_bwd_s", time.perf_counter() - start)
        return total / self.current_gradient_accumulation_steps

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def caption(self, dataset, batch_size: int | None = None, num_beams: int | None = None) -> list[str]:
        """Caption every image of `dataset` (`num_beams` beams, default `args.eval_num_beams`)."""
        from metrics.clip_judge import load_image

        unwrapped = self.accelerator.unwrap_model(self.model)
        was_training = unwrapped.training
        unwrapped.eval()
        batch_size = batch_size or self.args.per_device_eval_batch_size
        beams = num_beams or self.args.eval_num_beams
        captions: list[str] = []
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            pixel_values = self.processing_class(images=[load_image(im) for im in rows["image"]])["pixel_values"]
            vision = {"pixel_values": pixel_values.to(self.accelerator.device)}
            captions += self._decode(self._generate(vision, num_beams=beams, do_sample=False))[0]
        unwrapped.train(was_training)
        return captions

    def random_batches(self, n: int) -> list[list[int]]:
        """The evaluation's random batches of `args.eval_random_batch_size` images (fixed by `seed`)."""
        size = min(self.args.eval_random_batch_size, n)
        order = np.random.default_rng(self.args.seed).permutation(n)
        return [order[b * size : (b + 1) * size].tolist() for b in range(n // size)] if size >= 2 else []

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """R@1 by `eval_judge` among random batches of `args.eval_random_batch_size` images
        (`{prefix}_r1_random`, the authors' validation) and on the held-out bags
        (`{prefix}_r1_bags`), CIDEr-D against the `captions` column, mean caption length. Every
        process computes the same numbers (evaluation sets are small)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("SRTrainer.evaluate needs an eval_dataset")
        captions = self.caption(dataset)
        metrics: dict[str, float] = {}
        if self.eval_judge is not None:
            ids = list(dataset["cocoid"]) if "cocoid" in dataset.column_names else None
            image_emb = self.eval_judge.embed_images(list(dataset["image"]), ids=ids)
            text_emb = self.eval_judge.embed_texts(captions)

            def r1(groups: list[list[int]]) -> float:
                correct = [retrieval_scores(similarity(text_emb[g], image_emb[g]), torch.arange(len(g)))[1]
                           for g in groups]
                return 100.0 * torch.cat(correct).float().mean().item() if correct else math.nan

            metrics[f"{metric_key_prefix}_r1_random"] = r1(self.random_batches(len(dataset)))
            if self.eval_bags:
                metrics[f"{metric_key_prefix}_r1_bags"] = r1(self.eval_bags)
        if "captions" in dataset.column_names:
            from metrics.cider import cider_d

            from .rewards import as_references

            references = [as_references(r, "captions") for r in dataset["captions"]]
            metrics[f"{metric_key_prefix}_cider"] = float(cider_d(captions, references)[0])  # DF from these refs
        metrics[f"{metric_key_prefix}_mean_words"] = sum(len(c.split()) for c in captions) / max(1, len(captions))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged SR metrics collected since the last log (TRL style)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        for key, values in self._metrics[mode].items():
            valid = [v for v in values if not math.isnan(v)]
            logs[key if mode == "train" else f"eval_{key}"] = sum(valid) / len(valid) if valid else None
        self._metrics[mode].clear()
        super().log(logs, start_time)

    # -- checkpoints ---------------------------------------------------------------------------

    def sr_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the Trainer's own state: baseline and curriculum."""
        sampler = self.bag_sampler
        return {
            "baseline": self.baseline.state_dict(),
            "bag_epoch": sampler.epoch if sampler else None,
            "bag_size": sampler.bag_size if sampler else None,
            "bag_schedule": sampler.schedule if sampler else None,
            "nonfinite_rewards": self.nonfinite_rewards,
            "skipped_updates": self.skipped_updates,
        }

    def save_state(self) -> None:
        """`Trainer.save_state` (``trainer_state.json`` in `output_dir`), with the SR state in it."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, SRStateCallback):
                self.state.stateful_callbacks[SRStateCallback.__name__] = callback.state()
        super().save_state()

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` (or "true"/"last") resumes from the newest
        *complete* checkpoint of `output_dir` (one interrupted while saving is skipped)."""
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "last"):
            resume_from_checkpoint = True
        if resume_from_checkpoint is True:
            found = last_complete_checkpoint(self.args.output_dir)
            if found is None:
                raise FileNotFoundError(f"no complete SR checkpoint in {self.args.output_dir} to resume from; "
                                        "start without --resume_from_checkpoint")
            resume_from_checkpoint = found
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_callback_state(self) -> None:
        super()._load_callback_state()
        for callback in self.callback_handler.callbacks:  # a restored SRStateCallback lost its trainer
            if isinstance(callback, SRStateCallback):
                callback.trainer = self

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        state = read_sr_state(resume_from_checkpoint)
        if state is None:
            raise FileNotFoundError(f"{resume_from_checkpoint} holds no SR state (its {TRAINER_STATE_NAME} is missing, "
                                    "unreadable or was not written by SRTrainer): the baseline and curriculum "
                                    "cannot be restored. Resume from a complete checkpoint (resume_from_checkpoint=True "
                                    "picks the newest one).")
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.baseline.load_state_dict(state["baseline"])
        self.nonfinite_rewards = int(state.get("nonfinite_rewards", 0))
        self.skipped_updates = int(state.get("skipped_updates", 0))


__all__ = ["SRStateCallback", "SRTrainer", "completion_mask", "last_complete_checkpoint", "read_sr_state"]
