"""Run by tests/test_sr_robustness.py in a subprocess: SR training (SR-LV, tiny model) that saves a
checkpoint every 2 steps keeping only the newest one, so a test can SIGKILL it at any moment of a
save and resume it. ``python tests/sr_checkpoint_script.py OUT [--resume]`` writes the final
trainable parameters to OUT/final.safetensors."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)

from tests import tiny  # noqa: E402
from trainers import SRConfig, SRTrainer, sr_lora_config  # noqa: E402


def length_reward(completions, completion_ids, **kw):
    """A deterministic reward that needs no judge: longer captions with varied tokens score higher."""
    return [len(set(ids)) / (1 + len(ids)) + 0.1 * len(ids) for ids in completion_ids]


def main(out: str, resume: bool) -> None:
    tokenizer = tiny.build_tokenizer()
    model, processor = tiny.build_tiny_clipcap(tokenizer, seed=4)
    args = SRConfig(output_dir=str(Path(out) / "run"), per_device_train_batch_size=6, max_steps=6, save_steps=2,
                    save_strategy="steps", save_total_limit=1, bag_schedule="rand", learning_rate=5e-3,
                    max_new_tokens=5, report_to="none", logging_steps=1, use_cpu=True, seed=0, data_seed=0)
    trainer = SRTrainer(model, [length_reward], args=args, train_dataset=tiny.caption_dataset(24),
                        processing_class=processor, peft_config=sr_lora_config("LV", rank=4))
    trainer.train(resume_from_checkpoint=True if resume else None)
    from safetensors.torch import save_file

    params = {k: v.detach().contiguous() for k, v in trainer.model.named_parameters() if v.requires_grad}
    save_file(params, str(Path(out) / "final.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], "--resume" in sys.argv[2:])
