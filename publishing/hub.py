"""Hub push: the options both publishing CLIs share, the one-commit push, and the CLI flow
(check the repository id, stage into ``--dry-run OUT`` or a temporary folder, push, print).

``upload_model.py`` (model repositories) and ``python -m datasets_scripts.publish`` (dataset
repositories) call :func:`publish_folder` with a function that stages the folder; the push is one
commit (``HfApi.create_repo(exist_ok=True)``, ``create_branch`` with ``--revision``,
``upload_folder``). Log in first (``hf auth login``) or set ``HF_TOKEN``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from huggingface_hub import HfApi


class PublishError(Exception):
    """A folder that cannot be published as is, or a failed push; one clear message (exit status 1)."""


@dataclass(frozen=True)
class PushOptions:
    """Where and how to push: the ``--repo-id ... --delete-stale`` options of both publishing CLIs."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    dry_run: Path | None = None
    overwrite: bool = False
    commit_message: str | None = None
    delete_stale: bool = False

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, *, repo_help: str, dry_run_help: str,
                      commit_default: str) -> None:
        """Add the shared options to `parser` (the help texts name what the script publishes)."""
        parser.add_argument("--repo-id", required=True, metavar="USER/NAME", help=repo_help)
        parser.add_argument("--private", action="store_true", help="create the repository as private")
        parser.add_argument("--revision", metavar="BRANCH",
                            help="push to this branch (created if missing; default main)")
        parser.add_argument("--dry-run", metavar="OUT", type=Path, help=dry_run_help)
        parser.add_argument("--overwrite", action="store_true", help="replace OUT of --dry-run if it exists")
        parser.add_argument("--commit-message", help=f"commit message (default: {commit_default})")
        parser.add_argument("--delete-stale", action="store_true", help="delete files of the Hub repository that "
                            "the staged folder does not have (same commit)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PushOptions:
        return cls(args.repo_id, args.private, args.revision, args.dry_run, args.overwrite, args.commit_message,
                   args.delete_stale)

    def repo_id_error(self) -> str | None:
        """An error message when ``repo_id`` is not of the form USER/NAME, else None."""
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            return f"error: --repo-id {self.repo_id!r} must look like USER/NAME"
        return None

    def dry_run_error(self) -> str | None:
        """An error message when ``--dry-run OUT`` is a non-empty folder and ``--overwrite`` is not given."""
        out = self.dry_run
        if out is not None and out.exists() and any(out.iterdir()) and not self.overwrite:
            return f"error: --dry-run {out} exists and is not empty; pass --overwrite or choose another folder"
        return None


def push_folder(folder: str | os.PathLike, repo_id: str, *, repo_type: str = "dataset", private: bool = False,
                revision: str | None = None, commit_message: str, commit_description: str | None = None,
                delete_stale: bool = False, api: HfApi | None = None) -> str:
    """Create the repository if needed (and the branch `revision`), then upload `folder` in one
    commit. Returns the commit URL."""
    api = api or HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id=repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, revision=revision,
                                 commit_message=commit_message, commit_description=commit_description,
                                 delete_patterns="*" if delete_stale else None)
    except (OSError, ValueError) as err:  # HfHubHTTPError, offline mode, missing token, ... are OSErrors
        first = str(err).splitlines()[0] if str(err) else ""
        raise PublishError(f"pushing to the {repo_type} repository {repo_id!r} failed ({type(err).__name__}: {first}). "
                           "Are you logged in (`hf auth login` or HF_TOKEN) with write access?") from err
    return getattr(info, "commit_url", None) or str(info)


def publish_folder(options: PushOptions, *, repo_type: str, stage: Callable[[Path, Path], str],
                   dry_run_note: str = "", check_dry_run: bool = False) -> int:
    """The flow of a publishing CLI: check `options`, ``stage(out, workdir)`` (it writes the folder
    into `out` and returns the default commit message), then stop at ``--dry-run`` or push it.
    Prints the outcome; returns the exit status (0; 1 for a `PublishError`; 2 for a bad repo id, and
    with `check_dry_run` for a non-empty ``--dry-run`` folder without ``--overwrite``)."""
    if error := options.repo_id_error() or (options.dry_run_error() if check_dry_run else None):
        print(error, file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="publish-") as work:
            work = Path(work)
            out = options.dry_run if options.dry_run is not None else work / "staged"
            out.parent.mkdir(parents=True, exist_ok=True)
            message = stage(out, work)
            if options.dry_run is not None:
                print(f"Staged in {out} (dry run: nothing pushed).{dry_run_note}")
                return 0
            url = push_folder(out, options.repo_id, repo_type=repo_type, private=options.private,
                              revision=options.revision, commit_message=options.commit_message or message,
                              delete_stale=options.delete_stale)
            print(f"Pushed to {url}")
            return 0
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


__all__ = ["PublishError", "PushOptions", "publish_folder", "push_folder"]
