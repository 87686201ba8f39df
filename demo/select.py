"""The demo's choices, made on the validation bags only (never on the test bags).

    python -m demo.select --out demo_out          # seed 0; writes demo_out/selection.json
    python -m demo.select --out DIR --judges positional   # the same with the positional judges

Runs in the folder of ``make demo`` (its world, judges, MLE models and mined bags are reused) and
reads no test bag: every candidate is trained with ``train_sr.py`` and scored on the val split's
TrueMatch bags (mined by judge B with the same filter as the test bags, ``val_truematch/``).

1. **SR mode and learning rate** (:data:`LR_GRID`): the headline recipe (complete-description MLE
   -> SR + BagCurri + 0.5 CIDEr) with full fine-tuning and with SR-LV at each learning rate; each
   run keeps its checkpoint with the best val R@1 on bags of 3 (the choice of epochs and
   checkpoint). The criterion is the mean val TrueMatch R@1 over bags of 3/5/7; the best learning
   rate per mode is used for every row of that mode, and the better mode is the headline's.
2. **Caption length limit** (:data:`LIMITS`): the chosen recipe at each limit; the criterion is
   its gain over the complete-description MLE at the same limit (mean over bag sizes): the limit
   at which the SR method matters most, judged on validation only.

The choices are then written into ``demo.run`` (``SR_MODE``, ``DemoConfig.sr_lr`` /
``sr_lora_lr``, ``demo.world.CAPTION_TOKENS``) by hand, and the README reports the table of
``selection.json``. They are made once, on seed 0, and used for every seed of the study.
``judges`` picks the judge recipe (``demo.run.JUDGE_RECIPES``); run it in a folder of
``python -m demo.run`` with the same recipe, or its judges and bags are retrained first.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["LIMITS", "LR_GRID", "main", "select"]

LR_GRID = {"none": (3e-5, 1e-4, 3e-4), "LV": (1e-5, 3e-5, 1e-4)}
LIMITS = (12, 14, 16)


def _val_score(record: dict[str, Any], sizes) -> float:
    return sum(record["metrics"][f"val_truematch_r1_{s}"] for s in sizes) / len(sizes)


def _lr_name(mode: str, lr: float) -> str:
    return f"sel_{'full' if mode == 'none' else mode}_lr{lr:g}"


def select(out: str | Path, seed: int = 0, jobs: int = 2, threads: int = 1, phases=("lr", "length"),
           lr_grid: dict[str, tuple[float, ...]] | None = None, limits: tuple[int, ...] = LIMITS,
           judges: str = "default") -> dict[str, Any]:
    """Run the selection grid (val only) in ``out`` and write ``out/selection.json``."""
    from common import write_json
    from demo.run import SRRun, config_for, run_demo

    out = Path(out)
    lr_grid = lr_grid or LR_GRID
    base = replace(config_for(False, seed, judges=judges), sr_runs=(), test_eval=False)
    sizes = base.bag_sizes
    path = out / "selection.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    made_with = result.get("judges", "default")
    if result and made_with != judges:
        raise ValueError(f"{path} holds a selection made with the {made_with!r} judges; "
                         f"use another --out for --judges {judges}")
    result.update({"seed": seed, "judges": judges, "criterion_lr": "mean val TrueMatch R@1 over bags of 3/5/7 (judge B)",
                   "criterion_length": "gain over the complete-description MLE at the same limit, mean over 3/5/7"})
    if "lr" in phases:
        runs = tuple(SRRun(_lr_name(mode, lr), mode, "curri", "mle_complete", learning_rate=lr)
                     for mode, lrs in lr_grid.items() for lr in lrs)
        records = run_demo(out, cfg=replace(base, select_runs=runs), jobs=jobs, threads=threads)["stages"]
        table = []
        for run in runs:
            sr, val = records[run.name], records[f"val_{run.name}"]
            table.append({"run": run.name, "mode": run.lora_modules, "learning_rate": run.learning_rate,
                          "score": _val_score(val, sizes), **val["metrics"],
                          "best_step": sr.get("best_step"), "max_steps": sr.get("max_steps"),
                          "val_curve": sr.get("val_curve")})
        best = {mode: max((t for t in table if t["mode"] == mode), key=lambda t: t["score"]) for mode in lr_grid}
        mode = max(best, key=lambda m: best[m]["score"])
        result["lr"] = {"table": table, "best_lr": {m: b["learning_rate"] for m, b in best.items()},
                        "mode": mode, "init": {k: v for k, v in records["val_mle_complete"]["metrics"].items()}}
        write_json(path, result)
    if "length" in phases:
        if "lr" not in result:
            raise RuntimeError(f"{path} has no learning-rate selection yet: run the 'lr' phase first")
        mode = result["lr"]["mode"]
        lr = result["lr"]["best_lr"][mode]
        runs = tuple(SRRun(_lr_name(mode, lr), mode, "curri", "mle_complete", learning_rate=lr)  # phase 1's run
                     if limit == base.caption_tokens else
                     SRRun(f"sel_len{limit}", mode, "curri", "mle_complete", learning_rate=lr, caption_tokens=limit)
                     for limit in limits)
        cfg = replace(base, select_runs=runs, val_limits=tuple(x for x in limits if x != base.caption_tokens))
        records = run_demo(out, cfg=cfg, jobs=jobs, threads=threads)["stages"]
        table = []
        for run, limit in zip(runs, limits):
            sr_val = records[f"val_{run.name}"]
            init_val = records[f"val_mle_complete@{limit}" if limit != base.caption_tokens else "val_mle_complete"]
            table.append({"limit": limit, "sr": _val_score(sr_val, sizes), "init": _val_score(init_val, sizes),
                          "gain": _val_score(sr_val, sizes) - _val_score(init_val, sizes),
                          "best_step": records[run.name].get("best_step")})
        result["length"] = {"table": table, "mode": mode, "learning_rate": lr,
                            "limit": max(table, key=lambda t: t["gain"])["limit"]}
        write_json(path, result)
    return result


def main(argv: list[str] | None = None) -> int:
    from demo.run import JUDGE_RECIPES

    parser = argparse.ArgumentParser(prog="python -m demo.select", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="the make-demo folder (default: demo_out)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--phases", nargs="+", default=["lr", "length"], choices=["lr", "length"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--judges", choices=JUDGE_RECIPES, default="default",
                        help="judge recipe (default: default; positional: judges that see positions)")
    args = parser.parse_args(argv)
    try:
        result = select(args.out, args.seed, args.jobs, args.threads, tuple(args.phases), judges=args.judges)
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in result.items() if k in ("lr", "length")}, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
