"""Decoding speed: ClipCapForCaptioning.generate (library decoding, KV cache) vs a reference loop
without a cache that recomputes the whole prefix + caption every step, as the original ClipCap's
`generate_beam` / `generate2` do (they call GPT-2 on the full sequence each step and keep only the
last position's logits).

Real-size model with random weights: CLIP ViT-B/32 vision tower, GPT-2 124M, the paper's MLP
mapper (512 → 3840 → 7680, 10 prefix tokens). Both sides decode exactly `--new-tokens` tokens
(no early stop) from the same image embeddings; the CLIP tower runs once and is timed apart.

    python benchmarks/bench_generate.py [--batch-size 16] [--new-tokens 20] [--repeats 1]

Prints the speed-up ratios and writes benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_clipcap import ClipCapConfig, ClipCapForCaptioning  # noqa: E402


@torch.no_grad()
def reference_greedy(model: ClipCapForCaptioning, image_embeds: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: full forward over prefix + caption at every step."""
    prefix = model.get_prefix(image_embeds=image_embeds)
    ids = torch.empty(prefix.shape[0], 0, dtype=torch.long)
    for _ in range(steps):
        embeds = torch.cat([prefix, model.get_input_embeddings()(ids)], dim=1)
        logits = model(inputs_embeds=embeds).logits[:, -1]  # logits of every position are computed
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def reference_beam(model: ClipCapForCaptioning, image_embeds: torch.Tensor, steps: int, beams: int) -> torch.Tensor:
    """Beam search without a cache (batched over images): full forward of every beam every step."""
    prefix = model.get_prefix(image_embeds=image_embeds)
    batch = prefix.shape[0]
    prefix = prefix.repeat_interleave(beams, dim=0)  # (B*K, P, D)
    ids = torch.empty(batch * beams, 0, dtype=torch.long)
    scores = torch.zeros(batch, beams)
    scores[:, 1:] = -float("inf")  # all beams start identical: expand only the first
    for _ in range(steps):
        embeds = torch.cat([prefix, model.get_input_embeddings()(ids)], dim=1)
        logp = torch.log_softmax(model(inputs_embeds=embeds).logits[:, -1], -1)  # (B*K, V)
        vocab = logp.shape[-1]
        total = (scores.view(-1, 1) + logp).view(batch, beams * vocab)
        scores, flat = total.topk(beams, dim=-1)  # (B, K)
        beam_index = flat // vocab + torch.arange(batch).unsqueeze(1) * beams
        ids = torch.cat([ids[beam_index.view(-1)], (flat % vocab).view(-1, 1)], dim=1)
    best = scores.argmax(-1) + torch.arange(batch) * beams
    return ids[best]


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="best of N runs per measurement")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "generate.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = ClipCapForCaptioning(ClipCapConfig()).eval()  # ViT-B/32 + GPT-2 124M + MLP, random weights
    pixel_values = torch.randn(args.batch_size, 3, 224, 224)
    no_stop = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None)

    with torch.no_grad():
        clip_s, image_embeds = timed(lambda: model.get_image_embeds(pixel_values), 1)
    results: dict[str, object] = {
        "command": "python benchmarks/bench_generate.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available()},
        "batch_size": args.batch_size, "new_tokens": args.new_tokens, "clip_tower_s": round(clip_s, 3),
    }
    for name, beams in (("greedy", 1), (f"beam{args.beams}", args.beams)):
        ours_s, ours = timed(lambda: model.generate(image_embeds=image_embeds, num_beams=beams, do_sample=False,
                                                    **no_stop), args.repeats)
        if beams == 1:
            ref_s, ref = timed(lambda: reference_greedy(model, image_embeds, args.new_tokens), args.repeats)
            same = bool(torch.equal(ours, ref))
        else:
            ref_s, ref = timed(lambda: reference_beam(model, image_embeds, args.new_tokens, beams), args.repeats)
            same = None  # beam bookkeeping differs (length normalisation); only the work is compared
        results[name] = {"ours_s": round(ours_s, 3), "reference_s": round(ref_s, 3),
                         "speedup": round(ref_s / ours_s, 2), "same_tokens": same,
                         "speedup_with_clip_tower": round((ref_s + clip_s) / (ours_s + clip_s), 2)}
        print(f"{name:>7}: ours {ours_s:7.2f} s | no-cache reference {ref_s:7.2f} s | "
              f"speed-up {ref_s / ours_s:5.1f}x (incl. CLIP tower {clip_s:.2f} s: "
              f"{(ref_s + clip_s) / (ours_s + clip_s):4.1f}x)" + ("" if same is None else f" | same tokens: {same}"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
