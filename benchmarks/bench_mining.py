"""Bag mining at scale: blockwise exact top-k search (datasets_scripts.truematch.knn, called
"chunked" below) vs a naive full-matrix reference (knn_reference: the whole N x N similarity
matrix + a stable sort per row).

Workload per measurement (NDLB App. B.2 on the 118k COCO train images): random 1024-d
embeddings (seeded; 1% of the rows duplicated to force exact ties), the top-200 neighbours of
every row, then training bags of size 5 from them. Each measurement runs in a fresh subprocess
that reports

* `seconds`: wall time of the mining only (search + training bags; not the data generation);
* `cpu_seconds`: CPU time (user + system, all threads) of the same span; on a shared machine
  `cpu_seconds / threads` estimates the wall time the mining would take with the cores to itself;
* `peak_rss_mb`: the process's peak resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`),
  i.e. Python + torch + the embeddings + the mining;
* `base_rss_mb`: peak resident memory just before mining starts (interpreter, torch and the
  embeddings), so `peak_rss_mb - base_rss_mb` is what the mining itself added at most.

The chunked and naive outputs are compared at 10k (identical indices, similarities and bags
are required). The naive reference is not run at 118k: its N x N float32 matrix alone needs
N^2 * 4 bytes (56 GB); the JSON records that estimate.

    python benchmarks/bench_mining.py [--sizes 10000 118287] [--device cpu]

Prints ratios and writes benchmarks/results/mining.json. Timings depend on the machine and on
other processes running at the same time (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_embeddings(n: int, dim: int, seed: int = 0):
    """Seeded random embeddings with 1% of the rows copies of earlier rows (exact ties)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, dim, generator=g)
    n_dup = n // 100
    src = torch.randint(0, n, (n_dup,), generator=g)
    dst = torch.randperm(n, generator=g)[:n_dup]  # unique targets: with repeated ones the winner of
    m[dst] = m[src]                               # the parallel write would vary between processes
    return m


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import numpy as np
    import torch

    from datasets_scripts import truematch as tm

    torch.set_num_threads(args.threads)
    m = make_embeddings(args.n, args.dim)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    if args.mode == "chunked":
        sims, idx = tm.knn(m, args.top_k, device=args.device, max_block_bytes=args.block_mb * 2**20)
    else:
        sims, idx = tm.knn_reference(m, args.top_k)
    search = time.perf_counter() - start
    bags = tm.training_bags_from_knn(idx, args.bag_size, seed=0)
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.save:
        np.save(Path(args.save) / f"{args.mode}_{args.n}_idx.npy", idx.numpy())
        np.save(Path(args.save) / f"{args.mode}_{args.n}_sims.npy", sims.numpy())
        np.save(Path(args.save) / f"{args.mode}_{args.n}_bags.npy", np.asarray(bags))
    print(json.dumps({"mode": args.mode, "n": args.n, "seconds": round(seconds, 2), "search_seconds": round(search, 2),
                      "cpu_seconds": round(cpu, 1), "threads": args.threads,
                      "est_unloaded_seconds": round(cpu / args.threads, 1), "peak_rss_mb": round(peak),
                      "base_rss_mb": round(base), "n_bags": len(bags)}))


def run_one(mode: str, n: int, args, save: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--n", str(n), "--dim", str(args.dim), "--top-k",
           str(args.top_k), "--bag-size", str(args.bag_size), "--threads", str(args.threads), "--device",
           args.device, "--block-mb", str(args.block_mb), "--save", save]
    print(f"running {mode} at N={n} ...", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} N={n} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {res}", flush=True)
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 118_287], help="numbers of embeddings")
    p.add_argument("--reference-max", type=int, default=10_000, help="run the naive reference up to this N")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--bag-size", type=int, default=5)
    p.add_argument("--block-mb", type=int, default=512, help="memory budget of one similarity block (+ its transpose)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", help="device of the chunked search (cpu / cuda)")
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "mining.json")
    p.add_argument("--worker", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(argparse.Namespace(**{**vars(args), "mode": args.worker}))
        return {}

    import numpy as np

    load_before = os.getloadavg()
    results: dict = {"runs": [], "comparisons": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            chunked = run_one("chunked", n, args, tmp)
            results["runs"].append(chunked)
            if n <= args.reference_max:
                naive = run_one("naive", n, args, tmp)
                results["runs"].append(naive)
                same = all(np.array_equal(np.load(f"{tmp}/chunked_{n}_{x}.npy"), np.load(f"{tmp}/naive_{n}_{x}.npy"))
                           for x in ("idx", "sims", "bags"))
                if not same:
                    raise AssertionError(f"chunked and naive outputs differ at N={n}")
                results["comparisons"][str(n)] = {
                    "identical_output": same,
                    "time_ratio_naive_over_chunked": round(naive["seconds"] / chunked["seconds"], 2),
                    "cpu_time_ratio_naive_over_chunked": round(naive["cpu_seconds"] / chunked["cpu_seconds"], 2),
                    "peak_rss_ratio_naive_over_chunked": round(naive["peak_rss_mb"] / chunked["peak_rss_mb"], 2),
                    "added_rss_ratio_naive_over_chunked": round(
                        (naive["peak_rss_mb"] - naive["base_rss_mb"]) /
                        max(1, chunked["peak_rss_mb"] - chunked["base_rss_mb"]), 2),
                }
                cmp = results["comparisons"][str(n)]
                print(f"N={n}: identical output; naive/chunked time x{cmp['time_ratio_naive_over_chunked']} "
                      f"(CPU time x{cmp['cpu_time_ratio_naive_over_chunked']}), "
                      f"peak RSS x{cmp['peak_rss_ratio_naive_over_chunked']}")
            else:
                results["comparisons"][str(n)] = {
                    "naive_not_run": f"needs >= {n * n * 4 / 1e9:.0f} GB for the N x N float32 matrix alone"}
    chunked_runs = {r["n"]: r for r in results["runs"] if r["mode"] == "chunked"}
    if len(chunked_runs) >= 2:
        lo, hi = min(chunked_runs), max(chunked_runs)
        results["scaling"] = {"n_ratio": round(hi / lo, 2),
                              "time_ratio": round(chunked_runs[hi]["seconds"] / chunked_runs[lo]["seconds"], 2),
                              "cpu_time_ratio": round(chunked_runs[hi]["cpu_seconds"] / chunked_runs[lo]["cpu_seconds"], 2)}
        sc = results["scaling"]
        print(f"chunked N={hi} vs N={lo}: wall time x{sc['time_ratio']}, CPU time x{sc['cpu_time_ratio']} "
              f"for x{sc['n_ratio']} rows "
              f"(quadratic would be x{(hi / lo) ** 2:.0f}); peak RSS {chunked_runs[hi]['peak_rss_mb']} MB")
    import torch

    results["config"] = {"dim": args.dim, "top_k": args.top_k, "bag_size": args.bag_size, "block_mb": args.block_mb,
                         "threads": args.threads, "device": args.device, "cpu_count": os.cpu_count(),
                         "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                         "loadavg_before": [round(x, 2) for x in load_before],
                         "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                         "note": "other processes may have been running; see loadavg"}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
