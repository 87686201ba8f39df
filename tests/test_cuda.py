"""CUDA checks (run by benchmarks/gpu_check.sh on a GPU machine; skipped without CUDA): decoding,
one SR step and TrueMatch mining on the GPU agree with the CPU."""

import pytest
import torch

from tests import tiny

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


def test_generate_on_cuda_matches_cpu(tokenizer):
    model, processor = tiny.build_tiny_clipcap(tokenizer)
    pixel_values = processor(images=tiny.random_images(6, seed=1))["pixel_values"]
    cpu = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=8)
    gpu = model.to("cuda").generate(pixel_values=pixel_values.cuda(), num_beams=1, max_new_tokens=8).cpu()
    assert torch.equal(cpu, gpu)
    beams = model.generate(pixel_values=pixel_values.cuda(), num_beams=3, max_new_tokens=8)
    assert beams.shape[0] == 6 and beams.device.type == "cuda"
    bf16 = model.to(dtype=torch.bfloat16).generate(pixel_values=pixel_values.cuda(), num_beams=1, max_new_tokens=8)
    assert bf16.shape[0] == 6


def test_sr_step_on_cuda_in_bf16_updates_the_adapters(tmp_path, tokenizer, tiny_clip_judge_dir):
    from metrics.clip_judge import ClipJudge
    from trainers import SelfRetrievalReward, SRConfig, SRTrainer, sr_lora_config

    model, processor = tiny.build_tiny_clipcap(tokenizer)
    judge = ClipJudge.from_pretrained(str(tiny_clip_judge_dir), device="cuda", dtype="bfloat16")
    args = SRConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=2, bag_schedule="rand",
                    learning_rate=1e-2, max_new_tokens=5, bf16=True, report_to="none", save_strategy="no",
                    logging_steps=1)
    trainer = SRTrainer(model, [SelfRetrievalReward(judge)], args=args, train_dataset=tiny.caption_dataset(12),
                        processing_class=processor, peft_config=sr_lora_config("LV", rank=4))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    assert trainer.args.device.type == "cuda"
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[k], after[k].detach()) for k in before)
    assert all(torch.isfinite(h["loss"]) if isinstance(h.get("loss"), torch.Tensor) else True
               for h in trainer.state.log_history)


def test_mining_on_cuda_equals_cpu():
    from datasets_scripts.truematch_mining import knn

    g = torch.Generator().manual_seed(0)
    m = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g), dim=1)
    m[100:110] = m[:10]  # exact ties
    cpu_sims, cpu_idx = knn(m, 20)
    gpu_sims, gpu_idx = knn(m, 20, device="cuda")
    assert torch.equal(cpu_idx, gpu_idx)
    torch.testing.assert_close(cpu_sims, gpu_sims, rtol=0, atol=1e-6)
