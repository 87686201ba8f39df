"""Decoding speed: ClipCapForCaptioning.generate (library decoding, KV cache) vs a reference loop
without a cache that recomputes the whole prefix + caption every step, as the original ClipCap's
`generate_beam` / `generate2` do (they call GPT-2 on the full sequence each step and keep only the
last position's logits).

Then, in the same run, our `generate` with bf16 weights vs our float32 `generate` (greedy and
beam 5: speed ratio, and the share of greedy tokens equal to float32's), and a static KV cache
(`cache_implementation="static"`, which transformers compiles with `torch.compile`) vs the
default dynamic cache, greedy, in float32 and bf16 (`--static-cache`).

Real-size model with random weights: CLIP ViT-B/32 vision tower, GPT-2 124M, the paper's MLP
mapper (512 → 3840 → 7680, 10 prefix tokens). Every side decodes exactly `--new-tokens` tokens
(no early stop) from the same image embeddings; the CLIP tower runs once and is timed apart.

    python benchmarks/bench_generate.py [--batch-size 16] [--new-tokens 20] [--repeats 1] \
        [--device cpu|cuda] [--static-cache] [--no-reference]

Prints the ratios and writes benchmarks/results/generate.json (or `--output`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import write_results  # noqa: E402

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
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of positions where two (B, T) token tensors agree."""
    width = min(a.shape[1], b.shape[1])
    return round((a[:, :width] == b[:, :width]).float().mean().item(), 4)


def agreement_before_divergence(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How two decodings agree: first token, whole sequences, and the share of tokens before each
    row's first difference (after one differing token, the rest of a row follows another prefix)."""
    width = min(a.shape[1], b.shape[1])
    same = (a[:, :width] == b[:, :width]).cpu()
    before = torch.where(same.all(1), width, (~same).int().argmax(1)).float()  # equal tokens before the first difference
    return {"first_token": round(same[:, 0].float().mean().item(), 4),
            "whole_sequence": round(same.all(1).float().mean().item(), 4),
            "before_first_difference": round((before / width).mean().item(), 4)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="best of N runs per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--static-cache", action="store_true", help="also time a static, compiled KV cache")
    parser.add_argument("--no-reference", action="store_true", help="skip the no-cache reference loops")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "generate.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = ClipCapForCaptioning(ClipCapConfig()).eval().to(device)  # ViT-B/32 + GPT-2 124M + MLP, random weights
    model16 = ClipCapForCaptioning(ClipCapConfig()).eval()
    model16.load_state_dict(model.state_dict())
    model16 = model16.to(device, dtype=torch.bfloat16)
    pixel_values = torch.randn(args.batch_size, 3, 224, 224, device=device)
    no_stop = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None, do_sample=False)

    with torch.no_grad():
        clip_s, image_embeds = timed(lambda: model.get_image_embeds(pixel_values), 1)
    results: dict[str, object] = {
        "command": "python benchmarks/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
                    "processor": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "load_average": os.getloadavg()},
        "batch_size": args.batch_size, "new_tokens": args.new_tokens, "clip_tower_s": round(clip_s, 3),
    }
    fp32_tokens = {}
    for name, beams in (("greedy", 1), (f"beam{args.beams}", args.beams)):
        ours_s, ours = timed(lambda: model.generate(image_embeds=image_embeds, num_beams=beams, **no_stop),
                             args.repeats)
        fp32_tokens[name] = ours
        row = {"ours_s": round(ours_s, 3)}
        if not args.no_reference:
            if beams == 1:
                ref_s, ref = timed(lambda: reference_greedy(model, image_embeds, args.new_tokens), args.repeats)
                same = bool(torch.equal(ours, ref))
            else:
                ref_s, ref = timed(lambda: reference_beam(model, image_embeds, args.new_tokens, beams), args.repeats)
                same = None  # beam bookkeeping differs (length normalisation); only the work is compared
            row.update({"reference_s": round(ref_s, 3), "speedup": round(ref_s / ours_s, 2), "same_tokens": same,
                        "speedup_with_clip_tower": round((ref_s + clip_s) / (ours_s + clip_s), 2)})
            print(f"{name:>7}: ours {ours_s:7.2f} s | no-cache reference {ref_s:7.2f} s | "
                  f"speed-up {ref_s / ours_s:5.1f}x" + ("" if same is None else f" | same tokens: {same}"))
        results[name] = row
        # bf16 weights, the same image embeddings (the mapper casts them)
        bf16_s, bf16 = timed(lambda: model16.generate(image_embeds=image_embeds, num_beams=beams, **no_stop),
                             args.repeats)
        results[f"{name}_bf16"] = {"ours_s": round(bf16_s, 3), "speedup_vs_fp32": round(ours_s / bf16_s, 2),
                                   "token_agreement_vs_fp32": agreement(bf16, ours),
                                   "agreement_vs_fp32": agreement_before_divergence(bf16, ours)}
        print(f"{name + ' bf16':>12}: {bf16_s:7.2f} s | x{ours_s / bf16_s:4.2f} vs fp32 ours | "
              f"tokens equal to fp32: {100 * agreement(bf16, ours):.1f} %")
    if args.static_cache:
        for label, m in (("fp32", model), ("bf16", model16)):
            from transformers import CompileConfig

            compile_config = CompileConfig()
            compile_config._compile_all_devices = True  # transformers compiles only on accelerators by default
            static = dict(no_stop, cache_implementation="static", compile_config=compile_config)
            warm_s, _ = timed(lambda: m.generate(image_embeds=image_embeds, num_beams=1, **static), 1)  # compiles
            static_s, static_ids = timed(lambda: m.generate(image_embeds=image_embeds, num_beams=1, **static),
                                         args.repeats)
            dynamic_s = results["greedy"]["ours_s"] if label == "fp32" else results["greedy_bf16"]["ours_s"]
            results[f"greedy_static_{label}"] = {"first_call_s": round(warm_s, 3), "ours_s": round(static_s, 3),
                                                 "speedup_vs_dynamic": round(dynamic_s / static_s, 2),
                                                 "token_agreement_vs_fp32": agreement(static_ids, fp32_tokens["greedy"])}
            print(f"greedy static {label}: first call {warm_s:.2f} s, then {static_s:.2f} s | "
                  f"x{dynamic_s / static_s:4.2f} vs the dynamic cache")
    return write_results(args.output, results)


if __name__ == "__main__":
    main()
