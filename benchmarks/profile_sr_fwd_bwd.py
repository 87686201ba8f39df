"""Where the time of the SR log-prob forward + backward goes, fp32 vs bf16 autocast: one chunk of
captions (SRConfig's default of 10) through the real-size SR-LV captioner (CLIP ViT-B/32 + MLP +
GPT-2 124M with LoRA on both towers, random weights), timed with `torch.profiler` and grouped by
what the operators do:

- ``matmul``: the linear layers and attention products (``addmm``, ``mm``, ``bmm``, ``linear``,
  scaled-dot-product attention, ...), forward and backward;
- ``cast``: dtype conversions (``_to_copy``, ``copy_``): under autocast the frozen fp32 weights are
  cast to bf16 at every call (torch caches a cast only for leaf tensors that require grad);
- ``vocabulary``: the log-softmax / softmax / entropy over the 50,257-token vocabulary and its
  backward (float32 in SRTrainer by design);
- ``other``: everything else (layer norms, GELU, element-wise ops, indexing).

    python benchmarks/profile_sr_fwd_bwd.py [--chunk 10] [--tokens 40] [--repeats 3]

Shares are of the self CPU time of all operators; the wall time of each pass is reported too.
Writes benchmarks/results/profile_sr_fwd_bwd.json (or `--output`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import write_results  # noqa: E402

GROUPS = {
    "matmul": ("addmm", "mm", "bmm", "linear", "matmul", "baddbmm", "scaled_dot_product", "_flash_attention",
               "conv2d", "convolution", "mkldnn"),
    "cast": ("_to_copy", "copy_", "to"),
    "vocabulary": ("log_softmax", "_softmax", "softmax", "logsumexp", "gather", "entropy"),
}


def group_of(op: str) -> str:
    name = op.split("::")[-1]
    for group, keys in GROUPS.items():
        if any(name == k or name.startswith(k + "_") or name.startswith("_" + k) or k in name for k in keys):
            return group
    return "other"


def profile_pass(model, pixel_values, ids, mask, bf16: bool, repeats: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from trl.trainer.utils import selective_log_softmax

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask.long(),
                           logits_to_keep=ids.shape[1] + 1).logits[:, :-1].float()
        logps = selective_log_softmax(logits, ids, temperature=0.3)
        loss = -((logps * mask).sum(1)).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            walls.append(time.perf_counter() - start)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        totals[group_of(event.key)] = totals.get(group_of(event.key), 0.0) + event.self_cpu_time_total
    whole = sum(totals.values())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return {"wall_s": min(walls), "shares": {g: round(v / whole, 3) for g, v in sorted(totals.items())},
            "self_cpu_s": {g: round(v / 1e6 / repeats, 3) for g, v in sorted(totals.items())},
            "top_ops": [[e.key, round(e.self_cpu_time_total / 1e6 / repeats, 3)] for e in top]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk", type=int, default=10, help="captions per forward + backward (default: 10)")
    parser.add_argument("--tokens", type=int, default=40, help="caption tokens (default: 40)")
    parser.add_argument("--repeats", type=int, default=3, help="profiled passes per dtype (default: 3)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "profile_sr_fwd_bwd.json"))
    args = parser.parse_args(argv)

    import torch
    from peft import get_peft_model
    from trl.trainer.utils import disable_dropout_in_model

    from bench_sr_step import images, real_size_parts
    from trainers import sr_lora_config

    model, processor, _ = real_size_parts()
    model = get_peft_model(model, sr_lora_config("LV"))
    disable_dropout_in_model(model)
    model.train()
    pixel_values = processor(images=images(args.chunk))["pixel_values"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (args.chunk, args.tokens), generator=generator)
    mask = torch.ones(args.chunk, args.tokens)
    results = {"command": "python benchmarks/profile_sr_fwd_bwd.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "chunk": args.chunk, "tokens": args.tokens, "threads": torch.get_num_threads(),
               "load_average_before": os.getloadavg(),
               "fp32": profile_pass(model, pixel_values, ids, mask, False, args.repeats),
               "bf16": profile_pass(model, pixel_values, ids, mask, True, args.repeats)}
    results["bf16_speedup"] = round(results["fp32"]["wall_s"] / results["bf16"]["wall_s"], 2)
    for name in ("fp32", "bf16"):
        r = results[name]
        print(f"{name}: {r['wall_s']:.2f} s per pass; self CPU s by group: {r['self_cpu_s']}")
    print(f"bf16 speed-up of the pass: {results['bf16_speedup']}x")
    return write_results(Path(args.output), results)


if __name__ == "__main__":
    main()
