"""Publish the TrueMatch and HolisticCap dataset folders on the Hugging Face Hub (NDLB Sec. 2-3).

    python -m datasets_scripts.publish truematch --src truematch/ --repo-id USER/truematch
    python -m datasets_scripts.publish holisticcap --src holisticcap/ --repo-id USER/holisticcap
    python -m datasets_scripts.publish truematch --src truematch/ --repo-id USER/truematch --dry-run staged/

The source folders are those written by ``python -m datasets_scripts.truematch build`` (or
``datasets_scripts.review_bags apply``) and ``python -m datasets_scripts.vcb export``. Every config
is loaded with ``datasets.load_dataset`` and checked before anything is pushed, the dataset card is
completed (licences, ``dataset_info``, citation), and the staged folder is pushed as a dataset
repository in one commit. Log in first (``hf auth login``) or set ``HF_TOKEN``.

This is the command line only: validation, card and staging are ``publishing.dataset_staging``
(its docstring says what is checked and staged), the push options and the push ``publishing.hub``
(shared with ``upload_model.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from publishing.dataset_staging import KINDS, stage_dataset
from publishing.hub import PushOptions, publish_folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datasets_scripts.publish", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=sorted(KINDS), help="which dataset folder to publish")
    p.add_argument("--src", required=True, help="the folder written by datasets_scripts.truematch build / "
                   "review_bags apply (truematch) or datasets_scripts.vcb export (holisticcap)")
    PushOptions.add_arguments(p, repo_help="Hub dataset repository",
                              dry_run_help="only validate and stage into OUT; push nothing",
                              commit_default="names the dataset and its configs")
    p.add_argument("--cache-dir", help="datasets cache for the validation loads (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pretty = KINDS[args.kind].pretty_name

    def stage(out: Path, workdir: Path) -> str:
        report = stage_dataset(args.kind, args.src, out, cache_dir=args.cache_dir, overwrite=args.overwrite)
        rows = "; ".join(f"{c}: " + ", ".join(f"{s} {n}" for s, n in splits.items())
                         for c, splits in report.rows.items())
        print(f"{pretty} is valid ({rows}).")
        return f"Upload {pretty} ({', '.join(report.rows)}) with dataset card"

    return publish_folder(PushOptions.from_args(args), repo_type="dataset", stage=stage)


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
