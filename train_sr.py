"""Self-retrieval (SR) fine-tuning of an MLE-trained ClipCap with REINFORCE (NDLB Sec. 4).

    accelerate launch train_sr.py --model mle-holistic --dataset coco_karpathy/ \
        --bags bags/train_3.json bags/train_5.json bags/train_7.json --bag_schedule 3,5,7 \
        --rewards sr cider --reward_weights 1 0.5 --lora_modules LV --output_dir sr-lv-bagcurri

Rewards: `sr` (Eq. 1 with a frozen CLIP judge, `--judge`) and/or `cider` (CIDEr-D against the
`--references_column`, document frequencies from the training references). `--bags` are training
bag files written by `python -m datasets_scripts.truematch training-bags` ({"bag_size": s,
"cocoids": [[...], ...]}); `--bag_schedule` picks the size per epoch (BagCurri); without bags the
batch's random images are the distractors (DiscriTune). Every `SRConfig` / `TrainingArguments`
flag works (`--learning_rate`, `--num_train_epochs`, `--max_steps`, `--eval_strategy`,
`--resume_from_checkpoint`, `--report_to`...). The final model (LoRA merged) is written to
`--output_dir` and loads with `AutoModel.from_pretrained(DIR, trust_remote_code=True)`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoProcessor, HfArgumentParser

import modeling_clipcap  # noqa: F401  (registers the Auto classes)
from metrics.clip_judge import ClipJudge
from modeling_clipcap import ClipCapForCaptioning
from trainers import CiderReward, SelfRetrievalReward, SRConfig, SRTrainer, bags_from_cocoids, join_caption_columns


@dataclass
class SRScriptArguments:
    model: str = field(metadata={"help": "MLE-trained ClipCap folder or Hub id."})
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
    eval_judge: str | None = field(default=None, metadata={"help": "Judge for evaluation (default: --judge)."})
    sr_within_bag: bool = field(default=False, metadata={"help": "SR distractors = the caption's own bag only."})
    sr_temperature: float = field(default=1.0, metadata={"help": "Divides the cosine similarities in Eq. 1."})
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
        raise SystemExit(f"cannot read bag file {path}: {error}") from error
    bags = data["cocoids"] if isinstance(data, dict) else data
    sizes = {len(b) for b in bags}
    if len(sizes) != 1:
        raise SystemExit(f"{path}: bags of several sizes {sorted(sizes)}; write one file per size")
    size = int(data.get("bag_size", sizes.pop())) if isinstance(data, dict) else sizes.pop()
    return size, bags


def build_rewards(args: SRScriptArguments, train) -> tuple[list, ClipJudge | None]:
    rewards, judge = [], None
    for name in args.rewards:
        if name == "sr":
            judge = ClipJudge.from_pretrained(args.judge, backend=args.judge_backend, pretrained=args.judge_pretrained,
                                              cache_dir=args.judge_cache_dir)
            rewards.append(SelfRetrievalReward(judge, id_column=args.id_column, temperature=args.sr_temperature,
                                               within_bag=args.sr_within_bag))
        elif name == "cider":
            references = dict(zip(train[args.id_column], train[args.references_column]))
            rewards.append(CiderReward(references, id_column=args.id_column))
        else:
            raise SystemExit(f"unknown reward {name!r}: use 'sr' and/or 'cider'")
    return rewards, judge


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((SRScriptArguments, SRConfig), description=__doc__)
    script_args, config = parser.parse_args_into_dataclasses(args=argv)
    from datasets_scripts.coco import concat_splits, load_coco

    data = load_coco(script_args.dataset)
    train = concat_splits(data, script_args.train_split)
    evaluation = concat_splits(data, script_args.eval_split) if script_args.eval_split else None
    if script_args.captions_from:
        train = join_caption_columns(train, script_args.captions_from, script_args.id_column)
    train_bags = {}
    for path in script_args.bags:
        size, bags = read_bag_file(path)
        train_bags[size] = bags_from_cocoids(bags, train[script_args.id_column])
    eval_bags = None
    if script_args.eval_bags:
        if evaluation is None:
            raise SystemExit("--eval_bags needs --eval_split")
        eval_bags = bags_from_cocoids(read_bag_file(script_args.eval_bags)[1], evaluation[script_args.id_column])

    rewards, judge = build_rewards(script_args, train)
    eval_judge = ClipJudge.from_pretrained(script_args.eval_judge) if script_args.eval_judge else judge
    model = ClipCapForCaptioning.from_pretrained(script_args.model)
    processor = AutoProcessor.from_pretrained(script_args.model)
    trainer = SRTrainer(model, rewards, args=config, train_dataset=train, eval_dataset=evaluation,
                        processing_class=processor, train_bags=train_bags, eval_bags=eval_bags, eval_judge=eval_judge)
    result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json: log history, steps, best checkpoint
    final = trainer.accelerator.unwrap_model(trainer.model)
    if script_args.merge_lora and hasattr(final, "merge_and_unload"):
        final = final.merge_and_unload()
    if trainer.is_world_process_zero():
        final.save_pretrained(config.output_dir)
        processor.save_pretrained(config.output_dir)
        Path(config.output_dir, "training_args.json").write_text(config.to_json_string())  # readable, no pickle
    return dict(result.metrics)


if __name__ == "__main__":
    main(sys.argv[1:])
