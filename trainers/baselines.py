"""REINFORCE baselines (NDLB App. C.2; DiscriTune Sec. 3).

The advantage of a sampled caption is ``R - b``; the baseline ``b`` lowers the variance of the
gradient estimate without biasing it.

- :class:`MeanBaseline`: the running mean of all past batch-mean rewards (the paper's default):
  the current batch uses the mean *before* it is updated with the batch.
- :class:`GreedyBaseline`: self-critical (SCST, Rennie et al. 2017): the reward of the image's
  greedy caption. The paper uses it when CIDEr is part of the reward.
- :class:`LeaveOneOutBaseline`: RLOO (beyond the paper): with k sampled captions per image, the
  mean reward of the image's other k-1 captions.

Baselines have ``state_dict``/``load_state_dict`` so that checkpoints resume exactly.
"""

from __future__ import annotations

import torch


class MeanBaseline:
    """Running mean of past batch-mean rewards."""

    name = "mean"

    def __init__(self):
        self.mean = 0.0
        self.count = 0

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        """Baseline for each reward of the current batch: (n,) → (n,) (all equal)."""
        return torch.full_like(rewards, self.mean)

    def update(self, batch_mean: float) -> None:
        """Fold one batch's mean reward (already averaged over processes) into the running mean."""
        self.count += 1
        self.mean += (float(batch_mean) - self.mean) / self.count

    def state_dict(self) -> dict:
        return {"name": self.name, "mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


class GreedyBaseline:
    """Self-critical baseline: ``b_i = R(greedy caption of image i)``, repeated for its k samples."""

    name = "greedy"

    def __call__(self, rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
        """(n = images * k,) rewards and (images,) greedy rewards → (n,) baselines."""
        k = rewards.numel() // greedy_rewards.numel()
        return greedy_rewards.repeat_interleave(k)

    def update(self, batch_mean: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        pass


class LeaveOneOutBaseline:
    """RLOO: ``b_ij = mean_{l != j} R_il`` over the k >= 2 captions sampled for image i
    (samples of one image are contiguous, as ``generate(num_return_sequences=k)`` returns them)."""

    name = "rloo"

    def __init__(self, num_generations: int):
        if num_generations < 2:
            raise ValueError("the leave-one-out baseline needs num_generations >= 2")
        self.k = num_generations

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        grouped = rewards.view(-1, self.k)  # (images, k)
        others = (grouped.sum(1, keepdim=True) - grouped) / (self.k - 1)
        return others.reshape(-1)

    def update(self, batch_mean: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {"name": self.name, "k": self.k}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_baseline(name: str, num_generations: int = 1):
    """`"mean"`, `"greedy"` or `"rloo"` → a baseline object."""
    if name == "mean":
        return MeanBaseline()
    if name == "greedy":
        return GreedyBaseline()
    if name == "rloo":
        return LeaveOneOutBaseline(num_generations)
    raise ValueError(f"unknown baseline {name!r}; use 'mean', 'greedy' or 'rloo'")


__all__ = ["GreedyBaseline", "LeaveOneOutBaseline", "MeanBaseline", "build_baseline"]
