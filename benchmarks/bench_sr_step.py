"""Time of one self-retrieval (SR) training step, split into generation / reward / log-prob
forward+backward, peak memory, and bf16-vs-fp32 agreement: SRTrainer vs a naive reference, in the
same run.

Real-size models with random weights: ClipCap = CLIP ViT-B/32 vision tower + MLP mapper + GPT-2
124M (vocabulary padded to GPT-2's 50,257 tokens), the judge = CLIP ViT-B/32 (text and vision).
A batch holds `--bags` bags of `--bag-size` images (default 4 x 5 = 20 images; `--bags 20` gives
the paper's batch of 100), SR-LV LoRA (rank 32), sampling at temperature 0.3 up to
`--max-new-tokens` (40) tokens. Every side runs without dropout and times the optimizer step apart.

Variants (each in its own process; peak RSS = `ru_maxrss` of that process):

- `ours`: `SRTrainer`, float32: one batched `generate`, judge image embeddings cached across
  steps, captions embedded in one judge call, the log-prob forward + backward in chunks of
  `--logprob-chunk-size` captions (SRConfig's default, 10);
- `ours_bf16`: the same with `--bf16` (sampling and forward/backward in bf16 autocast, one bf16
  copy of the frozen weights per `generate`, judge in bf16; log-softmax, rewards and loss float32);
- `ours_unchunked`: `ours` with the whole micro-batch in one forward + backward (as before chunks);
- `naive`: one `generate` per image, every image re-embedded by the judge at every step and one
  judge call per caption; the forward + backward written out by hand, unchunked;
- `naive_fresh`: the naive forward + backward alone in a fresh process (random captions), to
  separate its cost from the state the per-image loops leave behind;
- `agreement`: on the same sampled captions, mean |delta| of the SR reward (bf16 vs fp32 judge) and
  of the captions' mean token log-probability (bf16 autocast vs fp32 forward).

The last of `--steps` SRTrainer steps is reported (the first also fills the judge cache).

    python benchmarks/bench_sr_step.py [--bags 4] [--bag-size 5] [--steps 2] [--variants ours ours_bf16 ...]

Prints ratios measured in the same run and writes benchmarks/results/sr_step.json (or `--output`).
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

from bench_common import write_results  # noqa: E402


def real_size_parts(seed: int = 0, judge_dtype: str | None = None, device: str = "cpu"):
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
    judge = ClipJudge.from_transformers(judge_model, tokenizer, image_processor, name="random-clip-b32",
                                        dtype=judge_dtype, device=device)
    return model, processor, judge


def images(n: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)) for _ in range(n)]


def run_ours(args, bf16: bool = False, chunk: int | None | str = "args") -> dict:
    import datasets

    from trainers import SelfRetrievalReward, SRConfig, SRTrainer, sr_lora_config

    model, processor, judge = real_size_parts(judge_dtype="bfloat16" if bf16 else None, device=args.device)
    chunk = args.logprob_chunk_size if chunk == "args" else chunk
    n = args.bags * args.bag_size
    data = datasets.Dataset.from_dict({"cocoid": list(range(n)), "image": images(n), "captions": [["x"]] * n})
    bags = {args.bag_size: [list(range(i, i + args.bag_size)) for i in range(0, n, args.bag_size)]}
    config = SRConfig(output_dir=str(Path(args.tmp) / "ours"), per_device_train_batch_size=n, max_steps=args.steps,
                      bag_schedule=str(args.bag_size), max_new_tokens=args.max_new_tokens, bf16=bf16,
                      logprob_chunk_size=chunk, report_to="none", save_strategy="no", logging_steps=1,
                      use_cpu=args.device == "cpu",
                      num_train_epochs=args.steps)
    trainer = SRTrainer(model, [SelfRetrievalReward(judge)], args=config, train_dataset=data,
                        processing_class=processor, train_bags=bags, peft_config=sr_lora_config("LV"))
    trainer.train()
    last = [h for h in trainer.state.log_history if "timing/generate_s" in h][-1]
    return {"generate_s": last["timing/generate_s"], "reward_s": last["timing/reward_s"],
            "logprob_fwd_bwd_s": last["timing/logprob_fwd_bwd_s"], "mean_caption_tokens": last["completions/mean_length"]}


def _naive_fwd_bwd(model, pixel_values, ids, rewards, mask) -> float:
    """The log-prob forward + backward written out by hand (no chunks), as SRTrainer did before."""
    from trl.trainer.utils import selective_log_softmax

    start = time.perf_counter()
    logits = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask.long()).logits
    logits = logits[:, model.config.prefix_length - 1 : -1] / 0.3
    logps = selective_log_softmax(logits, ids)
    loss = -(rewards * (logps * mask).sum(1) / mask.sum(1)).mean()
    loss.backward()
    return time.perf_counter() - start


def _naive_model(model):
    from peft import get_peft_model
    from trl.trainer.utils import disable_dropout_in_model

    from trainers import sr_lora_config

    model = get_peft_model(model, sr_lora_config("LV"))
    disable_dropout_in_model(model)  # as SRTrainer: log-probs of the policy that sampled
    return model


def run_naive(args) -> dict:
    import torch

    from metrics.clip_judge import retrieval_scores, similarity
    from trainers import completion_mask

    model, processor, judge = real_size_parts()
    n = args.bags * args.bag_size
    pictures = images(n)
    model = _naive_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=9e-8)
    stop = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    timings = {}
    for _ in range(args.naive_steps):
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
        rewards, _ = retrieval_scores(similarity(text_emb, image_emb), torch.arange(n), scale=judge.logit_scale)
        rewarded = time.perf_counter()
        mask = completion_mask(ids, stop)
        fwd_bwd = _naive_fwd_bwd(model, pixel_values, ids, rewards, mask)
        optimizer.step()  # outside the timings, as in SRTrainer
        optimizer.zero_grad()
        timings = {"generate_s": generated - start, "reward_s": rewarded - generated, "logprob_fwd_bwd_s": fwd_bwd,
                   "mean_caption_tokens": mask.sum(1).mean().item()}
    return timings


def run_naive_fresh(args) -> dict:
    """The naive forward + backward alone in a fresh process (random 40-token captions, no
    generation or judge work before it): isolates the state that the per-image loops leave."""
    import torch

    model, processor, _ = real_size_parts()
    n = args.bags * args.bag_size
    model = _naive_model(model)
    pixel_values = processor(images=images(n))["pixel_values"]
    ids = torch.randint(0, 50000, (n, args.max_new_tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, args.max_new_tokens)
    rewards = torch.randn(n, generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(2):  # report the second: the first also faults the buffers in
        times.append(_naive_fwd_bwd(model, pixel_values, ids, rewards, mask))
        model.zero_grad(set_to_none=True)
    return {"generate_s": 0.0, "reward_s": 0.0, "logprob_fwd_bwd_s": times[-1],
            "mean_caption_tokens": float(args.max_new_tokens)}


def run_agreement(args) -> dict:
    """bf16 vs float32 on the same sampled captions: mean |delta| of the SR reward (bf16 vs fp32
    judge) and of the captions' mean token log-probabilities (bf16 autocast vs fp32 forward)."""
    import torch
    from trl.trainer.utils import selective_log_softmax

    from metrics.clip_judge import ClipJudge, retrieval_scores, similarity
    from trainers import completion_mask

    model, processor, judge = real_size_parts(device=args.device)
    model = model.to(args.device)
    n = args.bags * args.bag_size
    pictures = images(n)
    pixel_values = processor(images=pictures)["pixel_values"].to(args.device)
    torch.manual_seed(0)
    with torch.no_grad():
        ids = model.generate(pixel_values=pixel_values, do_sample=True, temperature=0.3, top_k=None, num_beams=1,
                             max_new_tokens=args.max_new_tokens)
    mask = completion_mask(ids, model.generation_config.eos_token_id)
    captions = processor.batch_decode(ids)
    import copy

    judge16 = ClipJudge(copy.deepcopy(judge._backend), name=judge.name, dtype="bfloat16",
                        device=args.device)  # its own weights
    rewards = {}
    for name, j in (("fp32", judge), ("bf16", judge16)):
        sim = similarity(j.embed_texts(captions), j.embed_images(pictures))
        rewards[name] = retrieval_scores(sim, torch.arange(n), scale=j.logit_scale)[0]
    logps = {}
    kind = torch.device(args.device).type
    for name, ctx in (("fp32", torch.autocast(kind, enabled=False)), ("bf16", torch.autocast(kind, torch.bfloat16))):
        with torch.no_grad(), ctx:
            logits = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask.long(),
                           logits_to_keep=ids.shape[1] + 1).logits[:, :-1].float()
        token = selective_log_softmax(logits, ids, temperature=0.3)
        logps[name] = (token * mask).sum(1) / mask.sum(1)
    return {"reward_mean_abs_diff": (rewards["fp32"] - rewards["bf16"]).abs().mean().item(),
            "reward_mean_abs_fp32": rewards["fp32"].abs().mean().item(),
            "logprob_mean_abs_diff": (logps["fp32"] - logps["bf16"]).abs().mean().item(),
            "logprob_mean_abs_fp32": logps["fp32"].abs().mean().item(), "captions": n}


VARIANTS = {
    "ours": run_ours,
    "ours_bf16": lambda args: run_ours(args, bf16=True),
    "ours_unchunked": lambda args: run_ours(args, chunk=None),
    "naive": run_naive,
    "naive_fresh": run_naive_fresh,
}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.device != "cpu" and args.variant.startswith("naive"):
        raise SystemExit("the naive variants run on the CPU only; leave them out of --variants with --device cuda")
    if args.variant == "agreement":
        result = run_agreement(args)
    else:
        result = VARIANTS[args.variant](args)
        result["total_s"] = result["generate_s"] + result["reward_s"] + result["logprob_fwd_bwd_s"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and args.device != "cpu":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, default=4)
    parser.add_argument("--bag-size", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="SRTrainer steps per variant (the last is reported)")
    parser.add_argument("--naive-steps", type=int, default=1, help="steps of the naive reference (no cache to fill)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--logprob-chunk-size", type=int, default=10,
                        help="SRConfig.logprob_chunk_size of the ours variants (ours_unchunked: none)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the naive variants run on the CPU only)")
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, "agreement"],
                        choices=[*VARIANTS, "agreement"], help="what to run (default: all)")
    parser.add_argument("--variant", choices=[*VARIANTS, "agreement"], help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=os.path.join(tempfile.gettempdir(), "bench_sr_step"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "sr_step.json")
    args = parser.parse_args(argv)
    if args.variant:
        child(args)
        return {}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {"command": "python benchmarks/bench_sr_step.py " + " ".join(forwarded),
               "batch": f"{args.bags} bags x {args.bag_size} images", "machine": {"cpus": os.cpu_count()},
               "load_average_before": os.getloadavg()}
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--variant", variant, *forwarded]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if run.returncode != 0 or line is None:
            raise SystemExit(f"{variant} failed:\n{run.stderr[-3000:]}")
        results[variant] = json.loads(line[len("RESULT "):])
        print(f"{variant}: {results[variant]}", flush=True)
    phases = ("generate_s", "reward_s", "logprob_fwd_bwd_s", "total_s")
    results["ratios"] = {}
    for slower, faster in (("naive", "ours"), ("ours", "ours_bf16"), ("naive", "ours_bf16"),
                           ("ours_unchunked", "ours"), ("naive", "naive_fresh")):
        if slower in results and faster in results:
            key = f"{slower}/{faster}"
            results["ratios"][key] = {k: round(results[slower][k] / results[faster][k], 2) for k in phases
                                      if results[faster].get(k)}
            print(f"{key:>26}: " + "  ".join(f"{k} x{v}" for k, v in results["ratios"][key].items()))
    for variant in VARIANTS:
        if variant in results:
            print(f"{variant:>26}: total {results[variant]['total_s']:7.2f} s, "
                  f"peak RSS {results[variant]['peak_rss_mb']:7.0f} MB")
    return write_results(args.output, results)


if __name__ == "__main__":
    main()
