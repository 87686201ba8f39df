"""Every row of the demo over several seeds, with paired bootstrap confidence intervals.

    python -m demo.study --seeds 0 1 2 --out demo_out

Each seed reruns the whole demo (world, judges, MLE, mining, every SR row of
``demo.run.STUDY_RUNS``, evaluation): seed 0 in ``--out`` itself (sharing the stages of ``make
demo``), seed S in ``--out/seed_S``. Then ``--out/study.json`` holds, for every row, each metric
per seed and as mean ± std over seeds, and for the key differences of the paper's claims (NDLB −
its MLE initialisation, NDLB − SR with random distractors from the same initialisation, BagCurri −
each fixed bag size, complete-description MLE − sparse-reference MLE, ...) the difference in
TrueMatch R@1 per bag size with a 95 % paired bootstrap confidence interval over the test bags
pooled across seeds (stratified: bags are resampled within their seed and the seeds weigh
equally, so the point estimate is the mean over seeds), and the same for faithfulness
(hallucinated details per caption and attribute precision, paired over test images).
``--out/study.html`` shows it, and so does the study section of ``--out/report.html``.

Only test-set numbers that were fixed before the study enter here: every choice (learning rates,
checkpoints, caption length limit, SR mode) was made on the validation bags (``demo.select``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["DIFFERENCES", "FAITHFULNESS_DIFFERENCES", "METRICS", "bootstrap", "main", "run_study", "seed_dir",
           "summarise"]

# metrics summarised per row (all from results.json; R@1 in %, judge B unless ``_reward_judge``)
METRICS = ("truematch_r1_3", "truematch_r1_5", "truematch_r1_7", "random_r1", "cider", "vocab",
           "attribute_precision", "hallucinations_per_caption", "attributes_per_caption", "mean_length",
           "truematch_r1_3_reward_judge", "truematch_r1_5_reward_judge", "truematch_r1_7_reward_judge",
           "random_r1_reward_judge", "val_truematch_r1_3", "val_truematch_r1_5", "val_truematch_r1_7")
# (label, row a, row b): TrueMatch R@1 of a − b per bag size, paired over test bags
DIFFERENCES = (
    ("NDLB - its MLE initialisation (complete MLE)", "sr_bags_curri_from_complete", "mle_complete"),
    ("NDLB - SR with random distractors, same initialisation", "sr_bags_curri_from_complete", "sr_random_from_complete"),
    ("BagCurri - fixed bags of 3 (complete MLE init)", "sr_bags_curri_from_complete", "sr_bag3_from_complete"),
    ("BagCurri - fixed bags of 5 (complete MLE init)", "sr_bags_curri_from_complete", "sr_bag5_from_complete"),
    ("BagCurri - fixed bags of 7 (complete MLE init)", "sr_bags_curri_from_complete", "sr_bag7_from_complete"),
    ("complete-description MLE - sparse-reference MLE", "mle_complete", "mle"),
    ("lambda 0.5 - lambda 0 (NDLB with vs without CIDEr)", "sr_bags_curri_from_complete",
     "sr_bags_curri_from_complete_lambda0"),
    ("SR + BagCurri - MLE (sparse MLE init)", "sr_bags_curri", "mle"),
    ("SR + BagCurri - SR random distractors (sparse MLE init)", "sr_bags_curri", "sr_random"),
    ("NDLB - the other SR mode (same recipe)", "sr_bags_curri_from_complete", None),  # filled in by run_study
)
# (label, row a, row b): faithfulness of a − b, paired over test images
FAITHFULNESS_DIFFERENCES = (
    ("SR random distractors - BagCurri", "sr_random_from_complete", "sr_bags_curri_from_complete"),
    ("fixed bags of 3 - BagCurri", "sr_bag3_from_complete", "sr_bags_curri_from_complete"),
    ("fixed bags of 5 - BagCurri", "sr_bag5_from_complete", "sr_bags_curri_from_complete"),
    ("fixed bags of 7 - BagCurri", "sr_bag7_from_complete", "sr_bags_curri_from_complete"),
    ("NDLB - its MLE initialisation", "sr_bags_curri_from_complete", "mle_complete"),
    ("lambda 0 - lambda 0.5", "sr_bags_curri_from_complete_lambda0", "sr_bags_curri_from_complete"),
)


def seed_dir(out: Path, seed: int) -> Path:
    """Where seed ``seed`` of the study runs: ``out`` for seed 0 (the ``make demo`` folder), else ``out/seed_S``."""
    return out if seed == 0 else out / f"seed_{seed}"


def bootstrap(per_seed: list[dict[str, np.ndarray]], statistic: Callable[[dict[str, np.ndarray]], np.ndarray],
              n_boot: int = 10000, seed: int = 0, chunk: int = 500) -> dict[str, float]:
    """Stratified paired bootstrap: resample the items (bags or images) of each seed with
    replacement, apply ``statistic`` per seed, average over seeds.

    Args:
        per_seed: for each seed, named arrays over the same items (e.g. ``{"a": hits of a per
            bag, "b": hits of b per bag}``); resampling takes the same items from every array
            (paired).
        statistic: maps arrays of shape (R, n) (R resamples of n items) to (R,) values; called
            with (1, n) arrays for the point estimate.

    Returns:
        ``{"estimate", "ci_low", "ci_high", "n_items"}`` (95 % percentile interval).
    """
    rng = np.random.default_rng(seed)
    estimate = float(np.mean([statistic({k: v[None] for k, v in arrays.items()})[0] for arrays in per_seed]))
    total = np.zeros(n_boot)
    for arrays in per_seed:
        n = len(next(iter(arrays.values())))
        for start in range(0, n_boot, chunk):
            idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
            total[start : start + len(idx)] += statistic({k: v[idx] for k, v in arrays.items()})
    total /= len(per_seed)
    low, high = np.percentile(total, [2.5, 97.5])
    return {"estimate": estimate, "ci_low": float(low), "ci_high": float(high),
            "n_items": int(sum(len(next(iter(a.values()))) for a in per_seed))}


def _mean_difference(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return 100.0 * (arrays["a"] - arrays["b"]).mean(-1)


def _precision_difference(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return (arrays["a_true"].sum(-1) / np.maximum(1, arrays["a_said"].sum(-1))
            - arrays["b_true"].sum(-1) / np.maximum(1, arrays["b_said"].sum(-1)))


def _hallucination_difference(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return ((arrays["a_said"] - arrays["a_true"]) - (arrays["b_said"] - arrays["b_true"])).mean(-1)


def _bag_hits(folder: Path, row: str, size: int) -> np.ndarray | None:
    """Per-bag R@1 (share of the bag's captions retrieved, judge B) of one row on the test bags of ``size``."""
    path = folder / "hits" / f"{row}.json"
    if not path.is_file():
        return None
    bags = json.loads(path.read_text()).get(str(size), [])
    return np.array([np.mean(b) for b in bags], dtype=float)


def _caption_facts(folder: Path, row: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(attributes mentioned, of which true) per test caption of one row, in test-split order."""
    from datasets import load_from_disk

    from demo.run import caption_faithfulness

    path = folder / "captions" / f"{row}.json"
    if not path.is_file():
        return None
    test = load_from_disk(str(folder / "world"))["test"]
    captions = json.loads(path.read_text())
    facts = caption_faithfulness([captions[str(i)] for i in test["cocoid"]], test["scene"])
    return np.array([m for m, _ in facts], dtype=float), np.array([c for _, c in facts], dtype=float)


def summarise(per_seed_results: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Each row's metrics per seed and as mean ± std over the seeds that have it (sample std, ddof=1)."""
    rows: dict[str, dict[str, Any]] = {}
    for seed, results in per_seed_results.items():
        for row, metrics in results.items():
            if row == "meta":
                continue
            for key in METRICS:
                if isinstance(metrics.get(key), (int, float)):
                    rows.setdefault(row, {}).setdefault(key, {"per_seed": {}})["per_seed"][str(seed)] = metrics[key]
    for metrics in rows.values():
        for entry in metrics.values():
            values = np.array(list(entry["per_seed"].values()), dtype=float)
            entry["mean"] = float(values.mean())
            entry["std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return rows


def differences(folders: dict[int, Path], sizes=(3, 5, 7), other_mode_row: str | None = None,
                n_boot: int = 10000) -> dict[str, Any]:
    """The paired bootstrap CIs of :data:`DIFFERENCES` (TrueMatch, per size) and
    :data:`FAITHFULNESS_DIFFERENCES` (hallucinations per caption, attribute precision)."""
    out: dict[str, Any] = {"truematch": [], "faithfulness": []}
    for label, a, b in DIFFERENCES:
        b = b or other_mode_row
        if b is None:
            continue
        entry = {"label": label, "a": a, "b": b, "sizes": {}}
        for s in sizes:
            per_seed = []
            for folder in folders.values():
                ha, hb = _bag_hits(folder, a, s), _bag_hits(folder, b, s)
                if ha is not None and hb is not None and len(ha) == len(hb) and len(ha):
                    per_seed.append({"a": ha, "b": hb})
            if per_seed:
                entry["sizes"][str(s)] = {**bootstrap(per_seed, _mean_difference, n_boot), "seeds": len(per_seed)}
        if entry["sizes"]:
            out["truematch"].append(entry)
    for label, a, b in FAITHFULNESS_DIFFERENCES:
        per_seed = []
        for folder in folders.values():
            fa, fb = _caption_facts(folder, a), _caption_facts(folder, b)
            if fa is not None and fb is not None:
                per_seed.append({"a_said": fa[0], "a_true": fa[1], "b_said": fb[0], "b_true": fb[1]})
        if per_seed:
            out["faithfulness"].append({
                "label": label, "a": a, "b": b, "seeds": len(per_seed),
                "hallucinations_per_caption": bootstrap(per_seed, _hallucination_difference, n_boot),
                "attribute_precision": bootstrap(per_seed, _precision_difference, n_boot)})
    return out


def run_study(out: str | Path, seeds: list[int], jobs: int = 2, threads: int = 1, run: bool = True,
              n_boot: int = 10000, all_rows: bool = True, judges: str = "default") -> dict[str, Any]:
    """Run (or reuse) the study rows for every seed, then write ``study.json`` / ``study.html``
    and the study section of ``report.html``. ``run=False`` only aggregates finished seeds;
    ``all_rows=False`` runs only the rows of ``make demo`` (``demo.run.DEFAULT_RUNS``: the headline,
    its SR-random control and SR + BagCurri from the sparse MLE); differences whose rows are
    missing are left out. ``judges``: the judge recipe (``demo.run.config_for``)."""
    from demo.report import write_study_html
    from demo.run import OTHER_MODE, config_for, paper_runs, run_demo

    out = Path(out)
    folders = {seed: seed_dir(out, seed) for seed in seeds}
    for seed, folder in folders.items():
        if run:
            print(f"[study] seed {seed} in {folder}", file=sys.stderr)
            run_demo(folder, cfg=config_for(False, seed, study=all_rows, judges=judges), jobs=jobs, threads=threads,
                     command="python -m demo.study")
        if not (folder / "results.json").is_file():
            raise FileNotFoundError(f"{folder / 'results.json'} is missing: run `python -m demo.study --out {out} "
                                    f"--seeds {seed}` first")
    per_seed = {seed: json.loads((folder / "results.json").read_text()) for seed, folder in folders.items()}
    meta = per_seed[seeds[0]]["meta"]
    other = next(r.name for r in paper_runs(OTHER_MODE) if r.bags == "curri" and r.init == "mle_complete")
    study = {
        "seeds": seeds, "judges": judges, "folders": {str(s): str(f) for s, f in folders.items()},
        "bags_per_seed": {str(s): r["meta"]["bags"]["truematch"] for s, r in per_seed.items()},
        "judges_per_seed": {str(s): {w: j.get("pairs", {}).get("test", {}) for w, j in r["meta"]["judges"].items()}
                            for s, r in per_seed.items()},
        "sr_runs_per_seed": {str(s): r["meta"].get("sr_runs", {}) for s, r in per_seed.items()},
        "rows": summarise(per_seed),
        "differences": differences(folders, tuple(meta["bag_sizes"]), other, n_boot),
        "n_boot": n_boot,
    }
    from common import write_json

    write_json(out / "study.json", study)
    write_study_html(out, study)
    if 0 in folders and run:  # refresh seed 0's report: it shows the study section
        run_demo(folders[0], cfg=config_for(False, 0, study=all_rows, judges=judges), jobs=jobs, threads=threads,
                 command="python -m demo.study")
    return study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder (seed 0 runs there, seed S in OUT/seed_S)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes per seed (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1)")
    parser.add_argument("--no_run", action="store_true", help="only aggregate seeds that are already finished")
    parser.add_argument("--rows", choices=["all", "default"], default="all",
                        help="all: every row of the paper's experiments (default); default: only the rows of make demo")
    parser.add_argument("--n_boot", type=int, default=10000, help="bootstrap resamples (default: 10000)")
    from demo.run import JUDGE_RECIPES

    parser.add_argument("--judges", choices=JUDGE_RECIPES, default="default",
                        help="judge recipe (demo.run.POSITIONAL_JUDGES; default: default)")
    args = parser.parse_args(argv)
    try:
        study = run_study(args.out, args.seeds, jobs=args.jobs, threads=args.threads, run=not args.no_run,
                          n_boot=args.n_boot, all_rows=args.rows == "all", judges=args.judges)
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for entry in study["differences"]["truematch"]:
        print(entry["label"] + ": " + ", ".join(
            f"#{s} {v['estimate']:+.1f} [{v['ci_low']:+.1f}, {v['ci_high']:+.1f}]" for s, v in entry["sizes"].items()))
    print(f"wrote {Path(args.out) / 'study.json'} and {Path(args.out) / 'study.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
