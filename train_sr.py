"""Self-retrieval (SR) fine-tuning of an MLE-trained ClipCap with REINFORCE (NDLB Sec. 4).

    accelerate launch train_sr.py --model mle-holistic --dataset coco_karpathy/ \
        --bags bags/train_{2,3,5,7,10,15,20}.json --rewards sr cider --reward_weights 1 0.5 \
        --learning_rate 1e-7 --output_dir sr-lv-bagcurri
    accelerate launch train_sr.py --config recipes/sr_lv_bagcurri.yaml --model mle-holistic ...

The defaults are the paper's recipe (SR-LV, the authors' 20-epoch BagCurri over bags of
2/3/5/7/10/15/20, batch 100, lr 9e-8, temperature 0.3, Eq. 1 with the judge's logit scale; see
the README's "Training" section). `--config FILE.yaml` reads any of the flags below from a YAML
file (`recipes/` has one per paper experiment); flags on the command line override it.

Rewards: `sr` (Eq. 1 with a frozen CLIP judge, `--judge`) and/or `cider` (CIDEr-D against the
`--references_column`; document frequencies from the training references, or the batch as the
authors, `--cider_df batch`). `--bags` are training bag files written by
`python -m datasets_scripts.truematch training-bags` ({"bag_size": s, "cocoids": [[...], ...]});
`--bag_schedule rand` trains with random in-batch distractors (DiscriTune) and needs no bags.
Every `SRConfig` / `TrainingArguments` flag works (`--learning_rate`, `--num_train_epochs`,
`--max_steps`, `--eval_strategy`, `--resume_from_checkpoint True`, `--report_to`...). The final
model (LoRA merged) is written to `--output_dir` and loads with
`AutoModel.from_pretrained(DIR, trust_remote_code=True)`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoProcessor
from trl import TrlParser

import modeling_clipcap  # noqa: F401  (registers the Auto classes)
from metrics.clip_judge import ClipJudge
from trainers import (
    CiderReward,
    SelfRetrievalReward,
    SRConfig,
    SRTrainer,
    bags_from_cocoids,
    join_caption_columns,
    sr_lora_config,
)


@dataclass
class SRModelArguments:
    """Which model to fine-tune and how (TRL's `ModelConfig` shape)."""

    model: str = field(metadata={"help": "MLE-trained ClipCap folder or Hub id."})
    dtype: str | None = field(default=None, metadata={"help": "Weights dtype when loading: auto | float32 | bfloat16."})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager | sdpa | flash_attention_2."})
    lora_modules: str = field(
        default="LV", metadata={"help": "LoRA on L (SR-L: GPT-2), V (SR-V: CLIP vision), LV (SR-LV, the paper's best) "
                                        "or none (full fine-tuning of GPT-2 and the mapper)."}
    )
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank (paper: 32)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the authors' lora.py: 16)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})


@dataclass
class SRScriptArguments:
    dataset: str = field(metadata={"help": "COCO-format dataset folder (datasets_scripts.coco) or Hub id."})
    train_split: str = field(default="train", metadata={"help": "Split(s) to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "Held-out split for periodic evaluation."})
    bags: list[str] = field(default_factory=list, metadata={"help": "Training bag JSON files, one per bag size."})
    eval_bags: str | None = field(default=None, metadata={"help": "Bags of the eval split (same JSON format)."})
    rewards: list[str] = field(default_factory=lambda: ["sr"], metadata={"help": "sr and/or cider."})
    judge: str = field(default="openai/clip-vit-base-patch32", metadata={"help": "CLIP judge of the SR reward."})
    judge_backend: str = field(default="auto", metadata={"help": "auto | transformers | open_clip."})
    judge_pretrained: str | None = field(default=None, metadata={"help": "open_clip pretrained tag."})
    judge_cache_dir: str | None = field(default=None, metadata={"help": "Cache judge image embeddings here."})
    judge_dtype: str | None = field(
        default=None, metadata={"help": "Judge weights dtype: auto | float32 | bfloat16 (default: bfloat16 with "
                                        "--bf16, else float32)."}
    )
    eval_judge: str | None = field(default=None, metadata={"help": "Judge for evaluation (default: --judge)."})
    sr_within_bag: bool = field(default=False, metadata={"help": "SR distractors = the caption's own bag only."})
    sr_scale: str = field(
        default="judge", metadata={"help": "Multiplier of the cosines in Eq. 1: 'judge' = the judge's logit scale "
                                           "(100 for OpenAI CLIP, as the authors), or a number (1 = raw cosines)."}
    )
    cider_df: str = field(default="corpus", metadata={"help": "CIDEr document frequencies: corpus (training "
                                                              "references) | batch (the authors)."})
    id_column: str = field(default="cocoid", metadata={"help": "Image id column."})
    references_column: str = field(default="captions", metadata={"help": "References for CIDEr."})
    captions_from: str | None = field(
        default=None, metadata={"help": "Dataset with extra caption columns joined by cocoid (e.g. HolisticCap)."}
    )
    merge_lora: bool = field(default=True, metadata={"help": "Merge LoRA into the saved final model."})


def read_bag_file(path: str) -> tuple[int, list[list]]:
    """(bag size, bags of ids) from {"bag_size": s, "cocoids": [...]} or a plain list of bags."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: cannot read bag file {path}: {error}") from error
    bags = data.get("cocoids") if isinstance(data, dict) else data
    if not isinstance(bags, list) or not bags or not all(isinstance(b, list) for b in bags):
        raise SystemExit(f"error: {path} holds no bags: expected {{\"bag_size\": s, \"cocoids\": [[id, ...], ...]}}")
    sizes = {len(b) for b in bags}
    if len(sizes) != 1:
        raise SystemExit(f"error: {path}: bags of several sizes {sorted(sizes)}; write one file per size")
    size = int(data.get("bag_size", sizes.pop())) if isinstance(data, dict) else sizes.pop()
    return size, bags


def build_rewards(args: SRScriptArguments, train, bf16: bool = False) -> tuple[list, ClipJudge | None]:
    rewards, judge = [], None
    for name in args.rewards:
        if name == "sr":
            judge = ClipJudge.from_pretrained(args.judge, backend=args.judge_backend, pretrained=args.judge_pretrained,
                                              cache_dir=args.judge_cache_dir,
                                              dtype=args.judge_dtype or ("bfloat16" if bf16 else None))
            rewards.append(SelfRetrievalReward(judge, id_column=args.id_column, scale=args.sr_scale,
                                               within_bag=args.sr_within_bag))
        elif name == "cider":
            rewards.append(CiderReward.from_dataset(train, args.id_column, args.references_column,
                                                    document_frequency=args.cider_df))
        else:
            raise SystemExit(f"error: unknown reward {name!r}: use 'sr' and/or 'cider'")
    return rewards, judge


def parse_args(argv: list[str] | None = None) -> tuple[SRModelArguments, SRScriptArguments, SRConfig]:
    parser = TrlParser((SRModelArguments, SRScriptArguments, SRConfig), description=__doc__)
    try:
        model_args, script_args, config = parser.parse_args_and_config(args=argv)
    except (ValueError, OSError) as error:  # SRConfig.__post_init__ checks, unreadable --config
        parser.error(str(error))
    if model_args.lora_modules not in ("L", "V", "LV", "none"):
        parser.error(f"--lora_modules {model_args.lora_modules!r}: use L, V, LV or none")
    unknown = sorted(set(script_args.rewards) - {"sr", "cider"})
    if unknown or not script_args.rewards:
        parser.error(f"--rewards {' '.join(script_args.rewards)!r}: use sr and/or cider")
    if script_args.cider_df not in ("corpus", "batch"):
        parser.error(f"--cider_df {script_args.cider_df!r}: use corpus or batch")
    return model_args, script_args, config


def main(argv: list[str] | None = None) -> dict:
    model_args, script_args, config = parse_args(argv)
    from datasets_scripts.coco import concat_splits, load_caption_source, load_coco

    data = load_coco(script_args.dataset)
    train = concat_splits(data, script_args.train_split)
    evaluation = concat_splits(data, script_args.eval_split) if script_args.eval_split else None
    if script_args.captions_from:
        train = join_caption_columns(train, load_caption_source(script_args.captions_from), script_args.id_column)
    try:
        train_bags = {}
        for path in script_args.bags:
            size, bags = read_bag_file(path)
            train_bags[size] = bags_from_cocoids(bags, train[script_args.id_column],
                                                 where=f"the training split {script_args.train_split!r} ({path})")
        eval_bags = None
        if script_args.eval_bags:
            if evaluation is None:
                raise SystemExit("error: --eval_bags needs --eval_split")
            eval_bags = bags_from_cocoids(read_bag_file(script_args.eval_bags)[1], evaluation[script_args.id_column],
                                          where=f"the eval split {script_args.eval_split!r} ({script_args.eval_bags})")
    except (KeyError, ValueError) as error:
        raise SystemExit(f"error: {error.args[0] if error.args else error}") from error

    rewards, judge = build_rewards(script_args, train, bf16=config.bf16)
    eval_judge = ClipJudge.from_pretrained(script_args.eval_judge) if script_args.eval_judge else judge
    config.model_init_kwargs = {**(config.model_init_kwargs or {}),
                                **{k: v for k, v in (("dtype", model_args.dtype),
                                                     ("attn_implementation", model_args.attn_implementation)) if v}}
    peft_config = sr_lora_config(model_args.lora_modules, model_args.lora_rank, model_args.lora_alpha,
                                 model_args.lora_dropout)
    processor = AutoProcessor.from_pretrained(model_args.model)
    trainer = SRTrainer(model_args.model, rewards, args=config, train_dataset=train, eval_dataset=evaluation,
                        processing_class=processor, train_bags=train_bags, eval_bags=eval_bags, eval_judge=eval_judge,
                        peft_config=peft_config)
    result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json: log history, steps, best checkpoint
    final = trainer.accelerator.unwrap_model(trainer.model)
    if script_args.merge_lora and hasattr(final, "merge_and_unload"):
        final = final.merge_and_unload()
    if trainer.is_world_process_zero():
        final.save_pretrained(config.output_dir)
        processor.save_pretrained(config.output_dir)
        settings = {**asdict(model_args), **asdict(script_args), **json.loads(config.to_json_string())}
        Path(config.output_dir, "training_args.json").write_text(json.dumps(settings, indent=2))  # readable, no pickle
    return dict(result.metrics)


if __name__ == "__main__":
    main(sys.argv[1:])
