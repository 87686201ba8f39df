"""MLE pre-training of ClipCap with `transformers.Trainer` (NDLB Sec. 4.1-4.2, App. C.3 Table 11).

The mapper is trained from scratch, CLIP stays frozen and GPT-2 is fine-tuned; every
(image, caption) pair is one example. Paper defaults: batch 40, lr 2e-5 with linear decay,
1k warm-up steps, 30k steps.

    python train_mle.py --dataset coco_karpathy/ --caption_column captions --output_dir mle-coco
    accelerate launch train_mle.py --dataset coco_karpathy/ --captions_from holisticcap/ \
        --caption_column holisticcap --output_dir mle-holistic

`--config FILE.yaml` reads the flags from a YAML file (`recipes/mle_*.yaml`, one per Table 11 row);
flags on the command line override it.

Start from pretrained parts (`--clip openai/clip-vit-base-patch32 --gpt2 gpt2`, the default) or
from an existing ClipCap folder (`--model DIR`). Any `TrainingArguments` flag works
(`--max_steps`, `--report_to`, `--resume_from_checkpoint`...). The output folder loads with
`AutoModel.from_pretrained(DIR, trust_remote_code=True)`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoProcessor, CLIPImageProcessor, GPT2TokenizerFast, Trainer, TrainingArguments
from trl import TrlParser

import modeling_clipcap  # noqa: F401  (registers the Auto classes)
from modeling_clipcap import ClipCapForCaptioning, ClipCapProcessor, caption_stop_token_ids
from trainers import CaptionCollator, CaptionPairs, join_caption_columns


@dataclass
class MLEArguments:
    dataset: str = field(metadata={"help": "COCO-format dataset folder (datasets_scripts.coco) or Hub id."})
    caption_column: str = field(default="captions", metadata={"help": "captions | blendcap | holisticcap | ..."})
    captions_from: str | None = field(
        default=None, metadata={"help": "Dataset with extra caption columns joined by cocoid (e.g. the HolisticCap export)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split(s) to train on, e.g. 'train'."})
    eval_split: str | None = field(default=None, metadata={"help": "Split for eval_loss (e.g. 'val'); none by default."})
    model: str | None = field(default=None, metadata={"help": "Start from this ClipCap folder instead of --clip/--gpt2."})
    clip: str = field(default="openai/clip-vit-base-patch32", metadata={"help": "CLIP checkpoint (vision tower)."})
    gpt2: str = field(default="gpt2", metadata={"help": "GPT-2 checkpoint (language model and tokenizer)."})
    prefix_length: int = field(default=10, metadata={"help": "Prefix tokens per image."})
    mapping_type: str = field(default="mlp", metadata={"help": "mlp (the paper) | transformer (original ClipCap)."})
    max_caption_tokens: int | None = field(default=None, metadata={"help": "Truncate training captions to N tokens."})


@dataclass
class MLETrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's MLE defaults (App. C.3, Table 11)."""

    per_device_train_batch_size: int = field(default=40, metadata={"help": "Batch size (paper: 40)."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate (paper: 2e-5)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Linear decay (paper)."})
    warmup_steps: float = field(default=1000, metadata={"help": "Warm-up steps (paper: 1000)."})
    max_steps: int = field(default=30000, metadata={"help": "Total steps (paper: 30k)."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=2000, metadata={"help": "Checkpoint every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep raw columns for the collator."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Logging integrations."})


def build_model(args: MLEArguments) -> tuple[ClipCapForCaptioning, ClipCapProcessor]:
    if args.model:
        return ClipCapForCaptioning.from_pretrained(args.model), AutoProcessor.from_pretrained(args.model)
    tokenizer = GPT2TokenizerFast.from_pretrained(args.gpt2)
    model = ClipCapForCaptioning.from_clip_gpt2_pretrained(
        args.clip, args.gpt2, prefix_length=args.prefix_length, mapping_type=args.mapping_type,
        stop_token_ids=caption_stop_token_ids(tokenizer),
    )
    return model, ClipCapProcessor(CLIPImageProcessor.from_pretrained(args.clip), tokenizer)


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((MLEArguments, MLETrainingArguments), description=__doc__)
    try:
        script_args, training_args = parser.parse_args_and_config(args=argv)
    except (ValueError, OSError) as error:  # TrainingArguments checks, unreadable --config
        parser.error(str(error))
    from datasets_scripts.coco import concat_splits, load_caption_source, load_coco

    data = load_coco(script_args.dataset)
    captions = load_caption_source(script_args.captions_from) if script_args.captions_from else None

    def pairs(split: str) -> CaptionPairs:
        rows = concat_splits(data, split)
        if captions is not None:
            rows = join_caption_columns(rows, captions)
        return CaptionPairs(rows, script_args.caption_column)

    train = pairs(script_args.train_split)
    evaluation = pairs(script_args.eval_split) if script_args.eval_split else None
    model, processor = build_model(script_args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=CaptionCollator(processor, max_length=script_args.max_caption_tokens),
        processing_class=processor,
    )
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # the newest checkpoint of output_dir
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: log history, steps
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        Path(training_args.output_dir, "training_args.json").write_text(training_args.to_json_string())
    metrics = dict(result.metrics)
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("train", metrics)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
