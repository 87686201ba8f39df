"""Self-retrieval REINFORCE fine-tuning of ClipCap (NDLB Sec. 4.1, 4.5-4.8; App. B.2-B.3, C.1-C.4).

One training step, per micro-batch of whole bags (``BagBatchSampler``):

1. sample captions with ``model.generate`` (temperature 0.3, the model's 40-token limit, stop
   after a token containing ".") — no gradients;
2. score them with the reward functions (TRL convention), combine with ``reward_weights``;
3. subtract a baseline (running mean / greedy / leave-one-out);
4. recompute the captions' log-probabilities under the same tempered distribution in one
   teacher-forced forward pass, and minimise ``-(R - b) * log p(c | i)`` (token log-probs
   averaged over the caption, as the authors do, or summed).

The shape follows TRL's RLOO/GRPO trainers: a ``Trainer`` subclass overriding
``get_train_dataloader``, ``_prepare_inputs``, ``compute_loss``, ``training_step``, ``evaluate``
and ``log``, so ``accelerate launch``, checkpointing, resumption, ``report_to`` and callbacks work
as usual. LoRA (SR-L/SR-V/SR-LV) goes through ``peft``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from trl.trainer.utils import disable_dropout_in_model, entropy_from_logits, selective_log_softmax

from metrics.clip_judge import ClipJudge, retrieval_scores, similarity

from .bags import BagBatchSampler, BagCollator, BagCurriculumCallback, BagView, parse_bag_schedule
from .baselines import GreedyBaseline, build_baseline
from .lora import sr_lora_config
from .rewards import CiderReward, SelfRetrievalReward
from .sr_config import SRConfig

RewardFunc = Callable[..., list[float | None]]
SR_STATE_NAME = "sr_state.json"


def completion_mask(ids: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """1 for each caption token up to and including the first stop token, 0 after (padding).

    ids: (n, T) generated tokens → (n, T) float mask.
    """
    is_stop = torch.isin(ids, torch.tensor(list(stop_ids), device=ids.device))  # (n, T)
    stopped_before = (is_stop.cumsum(1) - is_stop.long()) > 0  # a stop token occurred earlier
    return (~stopped_before).float()


class SRTrainer(Trainer):
    """Trainer for self-retrieval (SR) fine-tuning with REINFORCE.

    Args:
        model: a `ClipCapForCaptioning` (MLE pre-trained) or a path/Hub id to load one from.
        reward_funcs: one reward function or a list (TRL calling convention, see
            `trainers.rewards`), e.g. `[SelfRetrievalReward(judge), CiderReward(train_refs)]`.
        args: an `SRConfig`.
        train_dataset: rows with an image column (`image`), an id column (`cocoid`) and any
            columns the reward functions read (`captions` for CIDEr).
        processing_class: the `ClipCapProcessor`.
        train_bags: `{bag size: [[row, ...], ...]}` training bags (rows of `train_dataset`), needed
            for every size of `args.bag_schedule`.
        eval_dataset / eval_bags: held-out images and bags (lists of rows) for periodic evaluation
            (R@1 on the bags by `eval_judge`, CIDEr-D against the `captions` column).
        eval_judge: judge for evaluation; defaults to the first `SelfRetrievalReward`'s judge.
        peft_config: LoRA config; by default built from `args.lora_modules` (SR-L/V/LV).
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
        if isinstance(model, str):
            from modeling_clipcap import ClipCapForCaptioning

            model = ClipCapForCaptioning.from_pretrained(model)
        if processing_class is None:
            raise ValueError("SRTrainer needs the ClipCapProcessor as `processing_class`.")
        self.base_config = model.config
        self.vision_trainable = args.lora_modules in ("V", "LV") or not model.config.freeze_vision
        if args.disable_dropout:
            disable_dropout_in_model(model)
        if peft_config is None:
            peft_config = sr_lora_config(args.lora_modules, args.lora_rank, args.lora_alpha, args.lora_dropout)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)

        self.reward_funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        self.reward_names = [getattr(f, "__name__", type(f).__name__) for f in self.reward_funcs]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"{len(weights)} reward weights for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        baseline = args.baseline
        if baseline == "auto":
            baseline = "greedy" if any(isinstance(f, CiderReward) for f in self.reward_funcs) else "mean"
        self.baseline = build_baseline(baseline, args.num_generations)

        generation = model.generation_config
        self.stop_ids = sorted(set(generation.eos_token_id if isinstance(generation.eos_token_id, list)
                                   else [generation.eos_token_id]) - {None})
        self.max_new_tokens = args.max_new_tokens or generation.max_new_tokens or 40

        self.eval_bags = [list(b) for b in eval_bags] if eval_bags is not None else None
        judges = [f.judge for f in self.reward_funcs if isinstance(f, SelfRetrievalReward)]
        self.eval_judge = eval_judge or (judges[0] if judges else None)
        self.bag_sampler = None
        if train_dataset is not None:
            self.bag_sampler = BagBatchSampler(len(train_dataset), args.per_device_train_batch_size, train_bags,
                                               parse_bag_schedule(args.bag_schedule), seed=args.seed)
            callbacks = [*(callbacks or []), BagCurriculumCallback(self.bag_sampler)]
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.nonfinite_skipped = 0

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

    # -- one step ------------------------------------------------------------------------------

    def _log_metric(self, name: str, value: float) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(float(value))

    def _score(self, captions: list[str], ids: torch.Tensor, columns: dict[str, list]) -> torch.Tensor:
        """(n, num_reward_funcs) rewards; NaN where a function returned None."""
        out = torch.full((len(captions), len(self.reward_funcs)), float("nan"))
        for j, func in enumerate(self.reward_funcs):
            values = func(prompts=[""] * len(captions), completions=captions, completion_ids=ids.tolist(),
                          trainer_state=self.state, log_metric=self._log_metric, log_extra=lambda *a, **k: None,
                          **columns)
            if len(values) != len(captions):
                raise ValueError(f"reward function {self.reward_names[j]!r} returned {len(values)} rewards "
                                 f"for {len(captions)} captions")
            out[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values])
        return out

    def _combine(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """Weighted sum over reward functions ignoring None (NaN); NaN when all are None."""
        combined = (rewards_per_func * self.reward_weights).nansum(1)
        combined[torch.isnan(rewards_per_func).all(1)] = math.nan
        return combined

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Sample captions, score them and compute advantages (no gradients)."""
        device = self.accelerator.device
        unwrapped = self.accelerator.unwrap_model(self.model)
        k = self.args.num_generations
        pixel_values = inputs["pixel_values"].to(device)
        columns = {key: value for key, value in inputs.items() if key != "pixel_values"}
        start = time.perf_counter()
        with torch.no_grad():
            vision = {"image_embeds": unwrapped.get_image_embeds(pixel_values)}  # (B, clip_dim)
            sample_kwargs = dict(do_sample=True, temperature=self.args.temperature, top_k=self.args.top_k or None,
                                 top_p=1.0, num_beams=1, num_return_sequences=k, max_new_tokens=self.max_new_tokens)
            ids = unwrapped.generate(**vision, **sample_kwargs)  # (B*k, T)
            greedy_ids = None
            if isinstance(self.baseline, GreedyBaseline):
                greedy_ids = unwrapped.generate(**vision, do_sample=False, num_beams=1,
                                                max_new_tokens=self.max_new_tokens)
        generated = time.perf_counter()
        mask = completion_mask(ids, self.stop_ids)
        captions = self.processing_class.batch_decode(ids)
        repeated = {key: [v for v in value for _ in range(k)] for key, value in columns.items()}
        rewards_per_func = self._score(captions, ids, repeated)  # (B*k, F)
        rewards = self._combine(rewards_per_func)  # (B*k,)
        if greedy_ids is not None:
            greedy = self._combine(self._score(self.processing_class.batch_decode(greedy_ids), greedy_ids, columns))
            baseline = self.baseline(rewards, greedy)
        else:
            baseline = self.baseline(rewards)
        self._log_metric("timing/generate_s", generated - start)
        self._log_metric("timing/reward_s", time.perf_counter() - generated)
        valid = torch.isfinite(rewards) & torch.isfinite(baseline)
        invalid_rewards = torch.isfinite(rewards_per_func).logical_or(torch.isnan(rewards_per_func)).logical_not()
        if invalid_rewards.any():
            self.nonfinite_skipped += int(invalid_rewards.any(1).sum())
            warnings.warn(f"{int(invalid_rewards.any(1).sum())} caption(s) got a non-finite reward; they are "
                          f"left out of this update (total so far: {self.nonfinite_skipped}).")
        advantages = torch.where(valid, rewards - baseline, torch.zeros_like(rewards))
        # the running baseline moves with the mean reward of the whole (multi-process) batch
        local_mean = rewards[valid].mean() if valid.any() else torch.tensor(math.nan)
        batch_means = self.accelerator.gather(local_mean.reshape(1).to(device)).float()
        if torch.isfinite(batch_means).any():
            self.baseline.update(batch_means[torch.isfinite(batch_means)].mean().item())

        self._log_rewards(rewards_per_func, rewards, baseline, mask, captions)
        prepared = {"completion_ids": ids, "completion_mask": mask.to(device),
                    "advantages": advantages.to(device), "valid": valid.to(device)}
        if self.vision_trainable:
            prepared["pixel_values"] = pixel_values.repeat_interleave(k, 0)
        else:
            prepared["image_embeds"] = vision["image_embeds"].repeat_interleave(k, 0)
        return prepared

    def _log_rewards(self, rewards_per_func, rewards, baseline, mask, captions) -> None:
        for j, name in enumerate(self.reward_names):
            values = rewards_per_func[:, j]
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
        self._log_metric("nonfinite_skipped", float(self.nonfinite_skipped))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """REINFORCE: ``-(R - b) * log p(c | i)`` averaged over the micro-batch's captions."""
        ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        vision = {k: inputs[k] for k in ("pixel_values", "image_embeds") if k in inputs}
        logits = model(**vision, input_ids=ids, attention_mask=mask.long()).logits  # (n, P + T, V)
        prefix_length = self.base_config.prefix_length
        logits = logits[:, prefix_length - 1 : -1] / self.args.temperature  # (n, T, V): same tempered policy
        token_logps = selective_log_softmax(logits, ids)  # (n, T)
        caption_logps = (token_logps * mask).sum(1)
        if self.args.logprob_reduction == "mean":
            caption_logps = caption_logps / mask.sum(1).clamp(min=1)
        loss = -(inputs["advantages"] * caption_logps).sum() / max(1, len(ids))
        with torch.no_grad():
            entropy = (entropy_from_logits(logits) * mask).sum() / mask.sum().clamp(min=1)
        self._log_metric("entropy", entropy.item())
        return (loss, logits) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Like `Trainer.training_step`, but a non-finite loss skips the backward pass on every
        process (no update from this micro-batch) with a warning and a counter."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        start = time.perf_counter()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        finite = self.accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0
        if not finite:
            self.nonfinite_skipped += 1
            warnings.warn(f"non-finite SR loss at step {self.state.global_step}: the update is skipped "
                          f"(total skipped: {self.nonfinite_skipped}).")
            return torch.zeros((), device=self.args.device)
        loss = loss / self.current_gradient_accumulation_steps
        self.accelerator.backward(loss)
        self._log_metric("timing/logprob_fwd_bwd_s", time.perf_counter() - start)
        return loss.detach()

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def caption(self, dataset, batch_size: int | None = None, num_beams: int | None = None) -> list[str]:
        """Caption every image of `dataset` (greedy, or `num_beams` beams)."""
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
            ids = unwrapped.generate(pixel_values=pixel_values.to(self.accelerator.device), num_beams=beams,
                                     do_sample=False, max_new_tokens=self.max_new_tokens)
            captions += self.processing_class.batch_decode(ids)
        unwrapped.train(was_training)
        return captions

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """R@1 on the held-out bags (by `eval_judge`), CIDEr-D against the `captions` column, mean
        caption length. Every process computes the same numbers (evaluation sets are small)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("SRTrainer.evaluate needs an eval_dataset")
        captions = self.caption(dataset)
        metrics: dict[str, float] = {}
        if self.eval_judge is not None:
            image_emb = self.eval_judge.embed_images(list(dataset["image"]),
                                                     ids=list(dataset["cocoid"]) if "cocoid" in dataset.column_names else None)
            text_emb = self.eval_judge.embed_texts(captions)
            bags = self.eval_bags or [list(range(len(dataset)))]
            correct = []
            for bag in bags:
                sim = similarity(text_emb[bag], image_emb[bag])  # (s, s)
                correct.append(retrieval_scores(sim, torch.arange(len(bag)))[1])
            metrics[f"{metric_key_prefix}_r1"] = 100.0 * torch.cat(correct).float().mean().item()
        if "captions" in dataset.column_names:
            from metrics.cider import cider_d

            references = [list(r) for r in dataset["captions"]]
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
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, SR_STATE_NAME), "w") as f:
                json.dump(self.sr_state(), f, indent=2)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, SR_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {resume_from_checkpoint} was not written by SRTrainer, "
                                    "so the baseline and curriculum cannot be restored.")
        with open(path) as f:
            state = json.load(f)
        self.baseline.load_state_dict(state["baseline"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))


__all__ = ["SRTrainer", "completion_mask"]
