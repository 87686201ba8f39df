"""Configuration of self-retrieval (SR) REINFORCE fine-tuning (NDLB Sec. 4, App. B.3, C.2-C.3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

LORA_MODES = ("L", "V", "LV", "none")
BASELINES = ("auto", "mean", "greedy", "rloo")


@dataclass
class SRConfig(TrainingArguments):
    r"""
    Configuration of [`SRTrainer`]. Only the SR-specific parameters are listed here; see
    [`~transformers.TrainingArguments`] for the rest. Defaults follow the paper (App. C.3,
    Table 12): AdamW, 100 images per batch, constant learning rate 9e-8 (use 1e-6 for a CIDEr-only
    reward and 1e-7 for SR + CIDEr), no warm-up.

    Parameters:
        > Parameters that control generation

        temperature (`float`, defaults to `0.3`):
            Sampling temperature (the authors' code). Log-probabilities are taken under the same
            tempered distribution.
        num_generations (`int`, defaults to `1`):
            Captions sampled per image (use >= 2 with the leave-one-out baseline).
        max_new_tokens (`int`, *optional*):
            Caption length limit; defaults to the model's generation config (40).
        top_k (`int`, defaults to `0`):
            Top-k filtering when sampling; 0 samples from the full distribution, as the authors do.

        > Parameters that control the loss

        logprob_reduction (`str`, defaults to `"mean"`):
            `"mean"`: token log-probabilities averaged over the caption length (the authors' code);
            `"sum"`: the caption's log-probability.
        disable_dropout (`bool`, defaults to `True`):
            Turn off dropout so that sampling and the log-probability pass see the same policy.

        > Parameters that control the reward

        reward_weights (`list[float]`, *optional*):
            Weight of each reward function (as in TRL); defaults to 1 each. SR + 0.5 CIDEr is the
            paper's best setting (App. C.4).
        baseline (`str`, defaults to `"auto"`):
            `"mean"` (running mean of past rewards, the paper's default), `"greedy"` (self-critical,
            the paper's choice when CIDEr is rewarded), `"rloo"` (leave-one-out over
            `num_generations` samples). `"auto"` = greedy when a CIDEr reward is used, else mean.

        > Parameters that control the bags

        bag_schedule (`str`, *optional*):
            Bag size per epoch, comma separated, the last one repeating: e.g. `"3,5,7"` (BagCurri,
            App. B.3) or `"5"` (fixed bags). `0`/`rand` = random in-batch distractors (DiscriTune);
            unset = random throughout. Training bags of each size are given to the trainer.

        > Parameters that control parameter-efficient fine-tuning (Sec. 4.5)

        lora_modules (`str`, defaults to `"LV"`):
            `"L"` (SR-L: LoRA on GPT-2), `"V"` (SR-V: LoRA on the CLIP vision tower), `"LV"` (SR-LV,
            the paper's best) or `"none"` (full fine-tuning of GPT-2 and the mapper). The mapper is
            always trained in full, as in the paper.
        lora_rank (`int`, defaults to `32`), lora_alpha (`int`, defaults to `16`),
        lora_dropout (`float`, defaults to `0.0`): LoRA hyper-parameters.

        > Parameters that control evaluation

        eval_num_beams (`int`, defaults to `1`):
            Beams when captioning the evaluation images (1 = greedy).
    """

    # generation
    temperature: float = field(default=0.3, metadata={"help": "Sampling temperature (log-probs use the same)."})
    num_generations: int = field(default=1, metadata={"help": "Captions sampled per image."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Caption length limit (default: the model's)."})
    top_k: int = field(default=0, metadata={"help": "Top-k when sampling; 0 = full distribution."})
    # loss
    logprob_reduction: str = field(default="mean", metadata={"help": "'mean' over caption tokens or 'sum'."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off during SR training."})
    # reward
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function."})
    baseline: str = field(default="auto", metadata={"help": "auto | mean | greedy | rloo."})
    # bags
    bag_schedule: str | None = field(
        default=None, metadata={"help": "Bag size per epoch, e.g. '3,5,7' (BagCurri); 0/rand = random distractors."}
    )
    # LoRA
    lora_modules: str = field(default="LV", metadata={"help": "L (SR-L), V (SR-V), LV (SR-LV) or none (full)."})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    # evaluation
    eval_num_beams: int = field(default=1, metadata={"help": "Beams for evaluation captions (1 = greedy)."})

    # defaults that differ from TrainingArguments (paper App. C.3, Table 12)
    learning_rate: float = field(default=9e-8, metadata={"help": "AdamW learning rate (paper: 9e-8 for SR)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})
    per_device_train_batch_size: int = field(default=100, metadata={"help": "Images per batch and device."})
    per_device_eval_batch_size: int = field(default=100, metadata={"help": "Images per evaluation batch."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Logging integrations."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: reward functions receive them."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); REINFORCE needs sampling.")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.logprob_reduction not in ("mean", "sum"):
            raise ValueError(f"logprob_reduction must be 'mean' or 'sum', got {self.logprob_reduction!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.baseline == "rloo" and self.num_generations < 2:
            raise ValueError("baseline='rloo' (leave-one-out) needs num_generations >= 2")
        if self.lora_modules not in LORA_MODES:
            raise ValueError(f"lora_modules must be one of {LORA_MODES}, got {self.lora_modules!r}")
        if self.remove_unused_columns:
            raise ValueError("SR training needs every dataset column (reward functions read them): "
                             "keep remove_unused_columns=False")


__all__ = ["SRConfig"]
