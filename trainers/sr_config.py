"""Configuration of self-retrieval (SR) REINFORCE fine-tuning (NDLB Sec. 4, App. B.3, C.2-C.3).

The defaults are the paper's recipe; where the paper is silent they are the authors' code
(``manugaurdl/no-detail-left-behind``, ``egg/zoo/emergent_captioner/finetuning/``): the 20-epoch
BagCurri schedule of ``configs/sr.yml`` (commit 3db9c82), AdamW with PyTorch's default weight
decay and no gradient clipping (``train.py``, ``egg/core/trainers.py``), sampling temperature 0.3
over the full vocabulary (``clipcap.py``), LoRA initialised as in ``lora.py``, and 5-beam captions
for evaluation (``clipcap.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

BASELINES = ("auto", "mean", "greedy", "rloo")
LORA_INITS = ("authors", "peft")
# The authors' BagCurri (configs/sr.yml, commit 3db9c82): {last epoch: bag size}, i.e. epochs 1-3
# bags of 2, 4-8 of 3, 9-10 of 5, 11-12 of 7, 13-14 of 10, 15-17 of 15, 18-20 of 20 (Table 10).
AUTHORS_BAG_CURRICULUM = "3:2,8:3,10:5,12:7,14:10,17:15,20:20"


@dataclass
class SRConfig(TrainingArguments):
    r"""
    Configuration of [`SRTrainer`]. Only the SR-specific parameters are listed here; see
    [`~transformers.TrainingArguments`] for the rest. The defaults are the paper's recipe (App. C.3,
    Table 12) and, where it is silent, the authors' code: AdamW (weight decay 0.01, no gradient
    clipping), 100 images per batch, constant learning rate 9e-8 (use 1e-6 for a CIDEr-only reward
    and 1e-7 for SR + CIDEr), no warm-up, 20 epochs of the authors' BagCurri schedule.

    Parameters:
        > Parameters that control the model

        model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments for `ClipCapForCaptioning.from_pretrained` when `SRTrainer` is given
            the model as a path or Hub id (as TRL's `model_init_kwargs`), e.g.
            `{"dtype": "bfloat16", "attn_implementation": "sdpa"}`.

        > Parameters that control generation

        temperature (`float`, defaults to `0.3`):
            Sampling temperature (the authors' `clipcap.py`). Log-probabilities are taken under the
            same tempered distribution.
        num_generations (`int`, defaults to `1`):
            Captions sampled per image (use >= 2 with the leave-one-out baseline).
        max_new_tokens (`int`, *optional*):
            Caption length limit; defaults to the model's generation config (40 for ClipCap: the
            authors' `max_len` 50 includes the 10 prefix positions).
        top_k (`int`, defaults to `0`):
            Top-k filtering when sampling; 0 samples from the full distribution, as the authors do.
        ds3_gather_for_generation (`bool`, defaults to `True`):
            Under DeepSpeed ZeRO-3, gather the full weights for `generate` (as TRL's GRPO); `False`
            generates on the sharded model (less memory, much slower).

        > Parameters that control the loss

        logprob_reduction (`str`, defaults to `"mean"`):
            `"mean"`: token log-probabilities averaged over the caption length (the authors' code);
            `"sum"`: the caption's log-probability.
        disable_dropout (`bool`, defaults to `True`):
            Turn off dropout so that sampling and the log-probability pass see the same policy.
        logprob_chunk_size (`int`, *optional*, defaults to `10`):
            Captions per forward + backward chunk of the log-probability pass (their float32 logits
            over the vocabulary are what fills memory: 10 x 41 x 50257 x 4 B ~ 82 MB per copy);
            None = the whole micro-batch at once. The gradient is the same either way. Measured
            (`benchmarks/bench_sr_step.py --bags 20`, 100 captions, fp32): peak RSS 5.5 GB with 10,
            8.3 GB with 25, 18.2 GB unchunked, and no slower than 25.

        > Parameters that control the reward

        reward_weights (`list[float]`, *optional*):
            Weight of each reward function (as in TRL); defaults to 1 each. SR + 0.5 CIDEr is the
            paper's best setting (App. C.4).
        baseline (`str`, defaults to `"auto"`):
            `"mean"` (running mean of past rewards, the paper's default), `"greedy"` (self-critical,
            the paper's choice when CIDEr is rewarded), `"rloo"` (leave-one-out over
            `num_generations` samples). `"auto"` = greedy when a CIDEr reward is used, else mean.

        > Parameters that control the bags

        bag_schedule (`str`, defaults to the authors' BagCurri `"3:2,8:3,10:5,12:7,14:10,17:15,20:20"`):
            Bag size per epoch. Either `last_epoch:size` pairs (the authors' `curricullum` format:
            epochs 1-3 bags of 2, 4-8 of 3, ...) or one size per epoch, comma separated (`"3,5,7"`);
            the last size repeats for later epochs. `"5"` = fixed bags of 5; `0`/`rand` = random
            in-batch distractors (DiscriTune). Training bags of every size used must be given to
            the trainer. A batch holds `per_device_train_batch_size // size` whole bags.

        > Parameters that control parameter-efficient fine-tuning (Sec. 4.5)

        lora_init (`str`, defaults to `"authors"`):
            How the LoRA adapters of the given `peft_config` start: `"authors"` re-initialises every
            `lora_A` with `N(0, 1)` and `lora_B` with zeros after `get_peft_model` (the authors'
            `finetuning/lora.py`); `"peft"` keeps PEFT's own initialisation (`lora_A` std ~0.02,
            which barely moves at the paper's learning rate).

        > Parameters that control evaluation

        eval_num_beams (`int`, defaults to `5`):
            Beams when captioning the evaluation images (the authors evaluate with 5 beams).
        eval_random_batch_size (`int`, defaults to `100`):
            `eval_r1_random` is the R@1 of each caption among random batches of this many evaluation
            images (a fixed permutation by `seed`; the remainder is dropped when the evaluation set
            holds at least one full batch), as the authors' validation loader of batch 100.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    # model
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for from_pretrained when the model is given by name."}
    )
    # generation
    temperature: float = field(default=0.3, metadata={"help": "Sampling temperature (log-probs use the same)."})
    num_generations: int = field(default=1, metadata={"help": "Captions sampled per image."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Caption length limit (default: the model's)."})
    top_k: int = field(default=0, metadata={"help": "Top-k when sampling; 0 = full distribution."})
    ds3_gather_for_generation: bool = field(
        default=True, metadata={"help": "DeepSpeed ZeRO-3: gather the weights for generation."}
    )
    # loss
    logprob_reduction: str = field(default="mean", metadata={"help": "'mean' over caption tokens or 'sum'."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off during SR training."})
    logprob_chunk_size: int | None = field(
        default=10, metadata={"help": "Captions per forward+backward chunk of the log-prob pass (memory)."}
    )
    # reward
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function."})
    baseline: str = field(default="auto", metadata={"help": "auto | mean | greedy | rloo."})
    # bags
    bag_schedule: str | None = field(
        default=AUTHORS_BAG_CURRICULUM,
        metadata={"help": "Bag size per epoch: 'last_epoch:size,...' (default: the authors' BagCurri), "
                          "'3,5,7' (one per epoch), '5' (fixed) or 'rand' (random distractors)."},
    )
    # LoRA
    lora_init: str = field(default="authors", metadata={"help": "authors (lora_A ~ N(0, 1)) | peft."})
    # evaluation
    eval_num_beams: int = field(default=5, metadata={"help": "Beams for evaluation captions (1 = greedy)."})
    eval_random_batch_size: int = field(default=100, metadata={"help": "Images per random evaluation batch."})

    # defaults that differ from TrainingArguments (paper App. C.3, Table 12; the authors' code)
    learning_rate: float = field(default=9e-8, metadata={"help": "AdamW learning rate (paper: 9e-8 for SR)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})
    num_train_epochs: float = field(default=20, metadata={"help": "Epochs (the authors' BagCurri runs 20)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (PyTorch's default, as the authors)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm; 0 = none (the authors)."})
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
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.logprob_reduction not in ("mean", "sum"):
            raise ValueError(f"logprob_reduction must be 'mean' or 'sum', got {self.logprob_reduction!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.baseline == "rloo" and self.num_generations < 2:
            raise ValueError("baseline='rloo' (leave-one-out) needs num_generations >= 2")
        if self.lora_init not in LORA_INITS:
            raise ValueError(f"lora_init must be one of {LORA_INITS}, got {self.lora_init!r}")
        if self.logprob_chunk_size is not None and self.logprob_chunk_size < 1:
            raise ValueError(f"logprob_chunk_size must be >= 1 (or None), got {self.logprob_chunk_size}")
        if self.eval_num_beams < 1:
            raise ValueError(f"eval_num_beams must be >= 1, got {self.eval_num_beams}")
        if self.eval_random_batch_size < 2:
            raise ValueError(f"eval_random_batch_size must be >= 2, got {self.eval_random_batch_size}")
        if self.remove_unused_columns:
            raise ValueError("SR training needs every dataset column (reward functions read them): "
                             "keep remove_unused_columns=False")
        from .bags import parse_bag_schedule

        parse_bag_schedule(self.bag_schedule)  # a malformed schedule fails here, not after loading data


__all__ = ["AUTHORS_BAG_CURRICULUM", "SRConfig"]
