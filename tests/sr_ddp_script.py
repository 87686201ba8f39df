"""Run by tests/test_train_scripts.py under `accelerate launch` with 2 CPU processes: trains
SRTrainer with gradient accumulation and records, per rank and micro-batch, which images and
bags each reward call saw (one JSON line per call in OUT/rank<r>.jsonl)."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import tiny  # noqa: E402
from trainers import SRConfig, SRTrainer, sr_lora_config  # noqa: E402


def main(out: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    tokenizer = tiny.build_tokenizer()
    model, processor = tiny.build_tiny_clipcap(tokenizer)
    data = tiny.caption_dataset(24)
    bags = {3: [list(range(i, i + 3)) for i in range(0, 24, 3)]}
    log = open(Path(out) / f"rank{rank}.jsonl", "w")

    def recorder(completions, cocoid, bag_id, trainer_state, **kw):
        log.write(json.dumps({"rank": rank, "step": trainer_state.global_step, "cocoid": cocoid,
                              "bag_id": bag_id}) + "\n")
        log.flush()
        return [float(len(c)) for c in completions]

    args = SRConfig(output_dir=str(Path(out) / "run"), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                    num_train_epochs=1, bag_schedule="3", learning_rate=1e-3, report_to="none", save_strategy="no",
                    max_new_tokens=4, use_cpu=True, logging_steps=1)
    trainer = SRTrainer(model, recorder, args=args, train_dataset=data, processing_class=processor, train_bags=bags,
                        peft_config=sr_lora_config("L", rank=4))
    trainer.train()
    log.close()
    with open(Path(out) / f"done{rank}.json", "w") as f:
        json.dump({"world_size": trainer.accelerator.num_processes, "global_step": trainer.state.global_step,
                   "baseline": trainer.baseline.state_dict(),
                   "distributed_type": str(trainer.accelerator.distributed_type)}, f)


if __name__ == "__main__":
    main(sys.argv[1])
