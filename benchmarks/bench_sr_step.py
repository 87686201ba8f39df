"""Time of one self-retrieval (SR) training step, split into generation / reward / log-prob
forward+backward, and peak memory: SRTrainer vs a naive reference, in the same run.

Real-size models with random weights: ClipCap = CLIP ViT-B/32 vision tower + MLP mapper + GPT-2
124M (vocabulary padded to GPT-2's 50,257 tokens), the judge = CLIP ViT-B/32 (text and vision).
A batch holds `--bags` bags of `--bag-size` images (default 4 x 5 = 20 images; `--bags 20` gives
the paper's batch of 100, peak RSS ~21 GB), SR-LV LoRA (rank 32), sampling at temperature 0.3 up to
`--max-new-tokens` (40) tokens. Both sides run without dropout and time the optimizer step apart.

- ours: `SRTrainer` — one batched `generate` for the whole batch, judge image embeddings cached
  across steps, captions embedded in one judge call, one teacher-forced forward + backward.
- naive reference: one `generate` per image (as a per-example loop), every image re-embedded by
  the judge at every step (no cache) and one judge call per caption; the same batched
  forward + backward.

Each variant runs in its own process (peak RSS = `ru_maxrss` of that process); the last of
`--steps` steps is reported (the first one also fills the judge cache for ours).

    python benchmarks/bench_sr_step.py [--bags 4] [--bag-size 5] [--steps 2]

Writes benchmarks/results/sr_step.json (or `--output`; the 20 x 5 run is in sr_step_20x5.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def real_size_parts(seed: int = 0):
    """(captioner, processor, judge) with random weights at real size, built offline."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from metrics.clip_judge import ClipJudge
    from modeling_clipcap import ClipCapConfig, ClipCapForCaptioning, ClipCapProcessor, caption_stop_token_ids
    from tests.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    # pad the locally trained vocabulary to GPT-2's size so that the LM head has its real cost
    tokenizer.add_tokens([f"<pad{i}>" for i in range(50257 - len(tokenizer))])
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    config = ClipCapConfig(text_config=dict(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                                            pad_token_id=eos), stop_token_ids=caption_stop_token_ids(tokenizer))
    model = ClipCapForCaptioning(config)
    image_processor = CLIPImageProcessor()
    processor = ClipCapProcessor(image_processor, tokenizer)
    judge_model = CLIPModel(CLIPConfig(text_config=dict(vocab_size=len(tokenizer), eos_token_id=eos, bos_token_id=eos,
                                                        pad_token_id=eos))).eval()
    tokenizer.model_max_length = 77
    judge = ClipJudge.from_transformers(judge_model, tokenizer, image_processor, name="random-clip-b32")
    return model, processor, judge


def images(n: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)) for _ in range(n)]


def run_ours(args) -> dict:
    import datasets

    from trainers import SRConfig, SRTrainer, SelfRetrievalReward

    model, processor, judge = real_size_parts()
    n = args.bags * args.bag_size
    data = datasets.Dataset.from_dict({"cocoid": list(range(n)), "image": images(n), "captions": [["x"]] * n})
    bags = {args.bag_size: [list(range(i, i + args.bag_size)) for i in range(0, n, args.bag_size)]}
    config = SRConfig(output_dir=str(Path(args.tmp) / "ours"), per_device_train_batch_size=n, max_steps=args.steps,
                      bag_schedule=str(args.bag_size), lora_modules="LV", max_new_tokens=args.max_new_tokens,
                      report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, num_train_epochs=args.steps)
    trainer = SRTrainer(model, [SelfRetrievalReward(judge)], args=config, train_dataset=data,
                        processing_class=processor, train_bags=bags)
    trainer.train()
    last = [h for h in trainer.state.log_history if "timing/generate_s" in h][-1]
    return {"generate_s": last["timing/generate_s"], "reward_s": last["timing/reward_s"],
            "logprob_fwd_bwd_s": last["timing/logprob_fwd_bwd_s"], "mean_caption_tokens": last["completions/mean_length"]}


def run_naive(args) -> dict:
    import torch
    from peft import get_peft_model
    from trl.trainer.utils import disable_dropout_in_model, selective_log_softmax

    from metrics.clip_judge import retrieval_scores, similarity
    from trainers import completion_mask, sr_lora_config

    model, processor, judge = real_size_parts()
    n = args.bags * args.bag_size
    pictures = images(n)
    model = get_peft_model(model, sr_lora_config("LV"))
    disable_dropout_in_model(model)  # as SRTrainer: log-probs of the policy that sampled
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=9e-8)
    stop = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    timings = {}
    for _ in range(args.steps):
        pixel_values = processor(images=pictures)["pixel_values"]
        start = time.perf_counter()
        with torch.no_grad():  # one caption at a time
            rows = [model.generate(pixel_values=pixel_values[i : i + 1], do_sample=True, temperature=0.3, top_k=None,
                                   num_beams=1, max_new_tokens=args.max_new_tokens)[0] for i in range(n)]
        width = max(len(r) for r in rows)
        ids = torch.stack([torch.cat([r, r.new_full((width - len(r),), pad)]) for r in rows])
        generated = time.perf_counter()
        captions = processor.batch_decode(ids)
        image_emb = torch.cat([judge.embed_images([p]) for p in pictures])  # no cache: every step
        text_emb = torch.cat([judge.embed_texts([c]) for c in captions])  # one call per caption
        rewards, _ = retrieval_scores(similarity(text_emb, image_emb), torch.arange(n))
        rewarded = time.perf_counter()
        mask = completion_mask(ids, stop)
        logits = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask.long()).logits
        logits = logits[:, model.config.prefix_length - 1 : -1] / 0.3
        logps = selective_log_softmax(logits, ids)  # as SRTrainer: the same forward + backward
        loss = -(rewards * (logps * mask).sum(1) / mask.sum(1)).mean()
        loss.backward()
        backward_done = time.perf_counter()  # the optimizer step is outside the timings, as in SRTrainer
        optimizer.step()
        optimizer.zero_grad()
        timings = {"generate_s": generated - start, "reward_s": rewarded - generated,
                   "logprob_fwd_bwd_s": backward_done - rewarded, "mean_caption_tokens": mask.sum(1).mean().item()}
    return timings


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = (run_ours if args.variant == "ours" else run_naive)(args)
    result["total_s"] = result["generate_s"] + result["reward_s"] + result["logprob_fwd_bwd_s"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, default=4)
    parser.add_argument("--bag-size", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variant", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=os.path.join(tempfile.gettempdir(), "bench_sr_step"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "sr_step.json")
    args = parser.parse_args(argv)
    if args.variant:
        child(args)
        return {}
    results = {"command": "python benchmarks/bench_sr_step.py " + " ".join(argv or sys.argv[1:]),
               "batch": f"{args.bags} bags x {args.bag_size} images", "machine": {"cpus": os.cpu_count()}}
    for variant in ("ours", "naive"):
        cmd = [sys.executable, __file__, "--variant", variant, *(argv or sys.argv[1:])]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if run.returncode != 0 or line is None:
            raise SystemExit(f"{variant} failed:\n{run.stderr[-3000:]}")
        results[variant] = json.loads(line[len("RESULT "):])
    ours, naive = results["ours"], results["naive"]
    results["speedup"] = {k: round(naive[k] / ours[k], 2) for k in ("generate_s", "reward_s", "logprob_fwd_bwd_s",
                                                                    "total_s")}
    for phase in ("generate_s", "reward_s", "logprob_fwd_bwd_s", "total_s"):
        print(f"{phase:>18}: ours {ours[phase]:7.2f} s | naive {naive[phase]:7.2f} s | "
              f"x{results['speedup'][phase]}")
    print(f"{'peak RSS':>18}: ours {ours['peak_rss_mb']:7.0f} MB | naive {naive['peak_rss_mb']:7.0f} MB")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
