"""Command line of Visual Caption Boost (paper Sec. 2, App. A).

    python -m datasets_scripts.vcb run --dataset COCO --split train --out vcb_out [--backend openai ...]
    python -m datasets_scripts.vcb export --run-dir vcb_out --dataset COCO --out holisticcap

``run`` captions with the three stages (each can run alone, ``--stages``), resumably;
``export`` writes the HolisticCap dataset folder and the caption-length table (App. A.2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any

from .backends import Backend
from .registry import BACKENDS, make_backend
from .data import load_split, parse_ids, parse_shard
from .export import DEFAULT_TOKENIZER, export_holisticcap
from .pipeline import StageReport, StageSettings, VCBError, run_stage
from .prompts import STAGES, SYSTEM_MODES, load_prompt

__all__ = ["main", "build_parser"]

DEFAULT_LLM = "mistralai/Mistral-7B-Instruct-v0.2"
DEFAULT_VLM = "Salesforce/instructblip-vicuna-7b"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datasets_scripts.vcb", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="caption a COCO split with BlendCap / VisualCap / HolisticCap (resumable)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = r.add_argument_group("data and output")
    g.add_argument("--dataset", required=True, help="COCO dataset (docs/formats.md): save_to_disk folder or parquet")
    g.add_argument("--split", default="train", help="split to caption")
    g.add_argument("--out", required=True, help="run folder; one sub-folder of JSONL shards per stage")
    g.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated stages; run in the order blendcap, visualcap, holisticcap")
    g.add_argument("--limit", type=int, default=None, help="only the first N selected ids")
    g.add_argument("--ids", default=None, help="ids to caption: '1,2,3' or @FILE with one id per line")
    g.add_argument("--shard", default=None, help="i/n: only ids with cocoid %% n == i (split work over machines)")
    g.add_argument("--shard-size", type=int, default=256, help="records per output file (a kill loses at most this)")
    g.add_argument("--flush-every", type=float, default=60.0, help="also write buffered records after this many s")
    g.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="a failed model call stops the run (raise), or its id is left for a rerun (skip)")
    g.add_argument("--allow-mixed-provenance", action="store_true",
                   help="add to a stage folder made with another model or prompt")
    g.add_argument("--min-words", type=int, default=3, help="captions with fewer words are flagged too_short")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = r.add_argument_group("models")
    g.add_argument("--backend", choices=BACKENDS, default="transformers",
                   help="backend of both models (echo: deterministic fake for dry runs)")
    g.add_argument("--llm-backend", choices=BACKENDS, default=None, help="backend of the LLM (default --backend)")
    g.add_argument("--vlm-backend", choices=BACKENDS, default=None, help="backend of the VLM (default --backend)")
    g.add_argument("--llm", default=None, help=f"LLM for BlendCap/HolisticCap (default {DEFAULT_LLM})")
    g.add_argument("--vlm", default=None, help=f"VLM for VisualCap (default {DEFAULT_VLM})")
    g.add_argument("--prompts-dir", default=None, help="folder with blendcap/visualcap/holisticcap.yaml "
                   "(default: the paper's prompts in datasets_scripts/prompts)")
    g.add_argument("--system-mode", choices=SYSTEM_MODES, default="auto",
                   help="system prompt as a system message, or merged into the first user turn")

    g = r.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=160)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="sampling seed sent to the server (openai)")

    g = r.add_argument_group("openai backend (vLLM, TGI, llama.cpp, Ollama ...)")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="API root of both models")
    g.add_argument("--llm-base-url", default=None, help="API root of the LLM (default --base-url)")
    g.add_argument("--vlm-base-url", default=None, help="API root of the VLM (default --base-url)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight per model")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt")
    g.add_argument("--max-retries", type=int, default=8, help="retries on 429/5xx/timeouts/connection/bad JSON")
    g.add_argument("--backoff-base", type=float, default=1.0, help="first retry waits about this many seconds")
    g.add_argument("--backoff-max", type=float, default=60.0, help="longest backoff (s)")
    g.add_argument("--jitter", type=float, default=0.5, help="backoff is scaled by U(1 - jitter, 1)")
    g.add_argument("--extra-body", default=None, help="JSON object merged into each request body")

    g = r.add_argument_group("transformers backend")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float16, ...")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--trust-remote-code", action="store_true")

    g = r.add_argument_group("echo backend")
    g.add_argument("--echo-delay", type=float, default=0.0, help="seconds per request")

    e = sub.add_parser("export", help="write the HolisticCap dataset folder (parquet + card) and length stats",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--run-dir", required=True, help="the --out folder of `run`")
    e.add_argument("--dataset", required=True, help="the COCO dataset the run captioned")
    e.add_argument("--out", required=True, help="dataset folder to write")
    e.add_argument("--splits", default=None, help="comma-separated splits (default: those with outputs)")
    e.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer for the token counts (App. A.2)")
    e.add_argument("--allow-partial", action="store_true", help="keep ids that lack some stage")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def _backend(args: argparse.Namespace, vision: bool) -> Backend:
    kind = (args.vlm_backend if vision else args.llm_backend) or args.backend
    name = args.vlm if vision else args.llm
    if kind == "echo":
        return make_backend("echo", name or ("echo-vlm" if vision else "echo-llm"), delay=args.echo_delay)
    options: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        device=args.device, dtype=args.dtype, batch_size=args.batch_size, num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty, trust_remote_code=args.trust_remote_code,
        system_mode="merge" if args.system_mode == "merge" else "auto" if args.system_mode == "auto" else "system",
        base_url=(args.vlm_base_url if vision else args.llm_base_url) or args.base_url,
        api_key=os.environ.get(args.api_key_env), concurrency=args.concurrency, timeout=args.timeout,
        max_retries=args.max_retries, backoff_base=args.backoff_base, backoff_max=args.backoff_max,
        jitter=args.jitter, extra_body=json.loads(args.extra_body) if args.extra_body else None)
    return make_backend(kind, name or (DEFAULT_VLM if vision else DEFAULT_LLM), vision=vision, **options)


def _print_reports(reports: list[StageReport]) -> None:
    print("\nstage        new   done  flagged  failed  retries  seconds  captions/s", file=sys.stderr)
    for r in reports:
        print(f"{r.stage:<12} {r.new:>5} {r.done_before:>6} {r.flagged:>8} {r.failed:>7} {sum(r.retries.values()):>8} "
              f"{r.seconds:>8.1f} {r.captions_per_s:>11.2f}", file=sys.stderr)
    for r in reports:
        print(r.summary(), file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]
    data = load_split(args.dataset, args.split)
    templates = {s: load_prompt(s, args.prompts_dir) for s in stages}
    settings = StageSettings(ids=parse_ids(args.ids), limit=args.limit, shard=parse_shard(args.shard),
                             shard_size=args.shard_size, flush_every_s=args.flush_every, system_mode=args.system_mode,
                             on_error=args.on_error, allow_mixed_provenance=args.allow_mixed_provenance,
                             min_words=args.min_words, progress=not args.no_progress,
                             manifest_extra={"argv": sys.argv[1:]})
    backends: dict[bool, Backend] = {}
    reports: list[StageReport] = []
    try:
        for stage in stages:
            vision = stage == "visualcap"
            if vision not in backends:
                backends[vision] = _backend(args, vision)
            reports.append(run_stage(stage, data, args.out, backends[vision], templates[stage], settings))
    finally:
        for b in backends.values():
            b.close()
        if reports:
            _print_reports(reports)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    summary = export_holisticcap(args.run_dir, args.dataset, args.out,
                                 splits=args.splits.split(",") if args.splits else None, tokenizer=args.tokenizer,
                                 allow_partial=args.allow_partial, overwrite=args.overwrite)
    print((open(os.path.join(args.out, "token_stats.md"), encoding="utf-8").read()))
    print(json.dumps({k: summary[k] for k in ("rows", "dropped_incomplete", "flags")}, indent=2))
    return 0


def _sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _sigterm)  # flush buffered records on `kill`
    try:
        return cmd_run(args) if args.command == "run" else cmd_export(args)
    except KeyboardInterrupt:
        print("interrupted: finished records are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    except (VCBError, FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
