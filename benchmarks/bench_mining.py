"""Bag mining at scale: the blockwise exact search (datasets_scripts.truematch_mining.knn, "chunked"
below) vs a naive full-matrix reference (knn_reference: the whole N x N float64 cosine matrix +
a stable sort per row) and vs the search it replaced ("baseline": rows rounded to 12-bit integer
codes, one exact float32 matmul, run from the module at git revision --baseline-rev).

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

Comparisons: chunked vs naive up to --reference-max rows (identical neighbours and bags are
required; the similarities agree to float64 rounding, the maximum difference is recorded); the
naive reference is not run at 118k, its N x N float64 matrix alone needs N^2 * 8 bytes (112 GB).
Chunked vs baseline at every size: the time and memory ratios, and how many neighbour lists and
bags the baseline's rounded cosines change.

    python benchmarks/bench_mining.py [--sizes 10000 118287] [--device cpu] [--baseline-rev REV]

Prints ratios and writes benchmarks/results/mining.json. Timings depend on the machine and on
other processes running at the same time (the load average is recorded around every run).
"""

from __future__ import annotations

import argparse
import importlib.util
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

from bench_common import write_results  # noqa: E402

BASELINE_REV = "4846442"  # the last revision with the 12-bit integer-code search


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


def load_baseline(rev: str, folder: str):
    """The mining module at git revision ``rev`` (datasets_scripts/truematch_mining.py, or
    datasets_scripts/truematch.py at revisions before the mining had its own module), imported."""
    def show(path: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)

    found = show("datasets_scripts/truematch_mining.py")
    text = (found if found.returncode == 0 else show("datasets_scripts/truematch.py")).stdout
    if not text:
        raise RuntimeError(f"no datasets_scripts/truematch_mining.py or truematch.py at git revision {rev!r}")
    path = Path(folder) / f"truematch_{rev}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"truematch_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import numpy as np
    import torch

    from datasets_scripts import truematch_mining as tm

    torch.set_num_threads(args.threads)
    if args.mode == "baseline":
        tm = load_baseline(args.baseline_rev, args.save)
    m = make_embeddings(args.n, args.dim)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load0 = os.getloadavg()[0]
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    if args.mode == "naive":
        sims, idx = tm.knn_reference(m, args.top_k)
    else:
        sims, idx = tm.knn(m, args.top_k, device=args.device, max_block_bytes=args.block_mb * 2**20)
    search = time.perf_counter() - start
    bags = tm.training_bags_from_knn(idx, args.bag_size, seed=0)
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(Path(args.save) / f"{args.mode}_{args.n}_idx.npy", idx.numpy())
    np.save(Path(args.save) / f"{args.mode}_{args.n}_sims.npy", sims.numpy())
    np.save(Path(args.save) / f"{args.mode}_{args.n}_bags.npy", np.asarray(bags))
    print(json.dumps({"mode": args.mode, "n": args.n, "seconds": round(seconds, 2), "search_seconds": round(search, 2),
                      "cpu_seconds": round(cpu, 1), "threads": args.threads,
                      "est_unloaded_seconds": round(cpu / args.threads, 1), "peak_rss_mb": round(peak),
                      "base_rss_mb": round(base), "n_bags": len(bags),
                      "loadavg_1min_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)]}))


def run_one(mode: str, n: int, args, save: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--n", str(n), "--dim", str(args.dim), "--top-k",
           str(args.top_k), "--bag-size", str(args.bag_size), "--threads", str(args.threads), "--device",
           args.device, "--block-mb", str(args.block_mb), "--save", save, "--baseline-rev", args.baseline_rev]
    print(f"running {mode} at N={n} ...", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} N={n} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {res}", flush=True)
    return res


def compare(tmp: str, n: int, a: str, b: str) -> dict:
    """How the outputs of modes a and b differ at N = n."""
    import numpy as np

    ia, ib = np.load(f"{tmp}/{a}_{n}_idx.npy"), np.load(f"{tmp}/{b}_{n}_idx.npy")
    sa, sb = np.load(f"{tmp}/{a}_{n}_sims.npy"), np.load(f"{tmp}/{b}_{n}_sims.npy")
    ba, bb = np.load(f"{tmp}/{a}_{n}_bags.npy"), np.load(f"{tmp}/{b}_{n}_bags.npy")
    set_differs = (np.sort(ia, axis=1) != np.sort(ib, axis=1)).any(axis=1)
    same_bags = ba.shape == bb.shape and bool((ba == bb).all())
    return {"identical_neighbours": bool((ia == ib).all()), "identical_bags": same_bags,
            "rows_with_other_neighbour_order": int((ia != ib).any(axis=1).sum()),
            "rows_with_other_neighbour_set": int(set_differs.sum()),
            "bags_differing": (int((ba != bb).any(axis=1).sum()) if ba.shape == bb.shape else "other bag count"),
            "max_abs_similarity_difference": float(np.abs(sa - sb).max())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 118_287], help="numbers of embeddings")
    p.add_argument("--reference-max", type=int, default=10_000, help="run the naive reference up to this N")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--bag-size", type=int, default=5)
    p.add_argument("--block-mb", type=int, default=512, help="memory budget of one similarity block")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", help="device of the chunked search (cpu / cuda)")
    p.add_argument("--baseline-rev", default=BASELINE_REV,
                   help=f"git revision of the search to compare with (default {BASELINE_REV}, the 12-bit codes)")
    p.add_argument("--no-baseline", action="store_true", help="do not run the baseline")
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "mining.json")
    p.add_argument("--worker", choices=["chunked", "naive", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(argparse.Namespace(**{**vars(args), "mode": args.worker}))
        return {}

    load_before = os.getloadavg()
    results: dict = {"runs": [], "comparisons": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            chunked = run_one("chunked", n, args, tmp)
            results["runs"].append(chunked)
            cmp: dict = {}
            if n <= args.reference_max:
                naive = run_one("naive", n, args, tmp)
                results["runs"].append(naive)
                cmp["chunked_vs_naive"] = {
                    **compare(tmp, n, "chunked", "naive"),
                    "time_ratio_naive_over_chunked": round(naive["seconds"] / chunked["seconds"], 2),
                    "peak_rss_ratio_naive_over_chunked": round(naive["peak_rss_mb"] / chunked["peak_rss_mb"], 2)}
                c = cmp["chunked_vs_naive"]
                if not (c["identical_neighbours"] and c["identical_bags"]):
                    raise AssertionError(f"chunked and naive outputs differ at N={n}: {c}")
                print(f"N={n}: chunked = naive (neighbours, bags; similarities to {c['max_abs_similarity_difference']:.1e}); "
                      f"naive/chunked time x{c['time_ratio_naive_over_chunked']}, peak RSS x{c['peak_rss_ratio_naive_over_chunked']}")
            else:
                cmp["naive_not_run"] = f"needs >= {n * n * 8 / 1e9:.0f} GB for the N x N float64 matrix alone"
            if not args.no_baseline:
                base = run_one("baseline", n, args, tmp)
                results["runs"].append(base)
                cmp["chunked_vs_baseline"] = {
                    **compare(tmp, n, "chunked", "baseline"),
                    "time_ratio_chunked_over_baseline": round(chunked["seconds"] / base["seconds"], 2),
                    "cpu_time_ratio_chunked_over_baseline": round(chunked["cpu_seconds"] / base["cpu_seconds"], 2),
                    "peak_rss_ratio_chunked_over_baseline": round(chunked["peak_rss_mb"] / base["peak_rss_mb"], 2)}
                c = cmp["chunked_vs_baseline"]
                print(f"N={n}: chunked/baseline time x{c['time_ratio_chunked_over_baseline']} (CPU time "
                      f"x{c['cpu_time_ratio_chunked_over_baseline']}), peak RSS x{c['peak_rss_ratio_chunked_over_baseline']}; "
                      f"the baseline's rounding changes {c['rows_with_other_neighbour_order']}/{n} neighbour lists, "
                      f"{c['bags_differing']} bags")
            results["comparisons"][str(n)] = cmp
    import torch

    results["config"] = {"dim": args.dim, "top_k": args.top_k, "bag_size": args.bag_size, "block_mb": args.block_mb,
                         "threads": args.threads, "device": args.device, "baseline_rev": args.baseline_rev,
                         "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                         "torch": torch.__version__, "loadavg_before": [round(x, 2) for x in load_before],
                         "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                         "note": "other processes may have been running; see the load averages"}
    return write_results(args.output, results)


if __name__ == "__main__":
    main()
