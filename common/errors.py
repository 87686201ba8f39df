"""The shape of the project's user-facing errors, written once."""

from __future__ import annotations

import os

__all__ = ["not_found"]


def not_found(what: str, path: str | os.PathLike, fix: str | None = None) -> FileNotFoundError:
    """``FileNotFoundError("<what> not found: <path>; <fix>")``: what was looked for, where, and
    what to do about it (e.g. the command that builds it). Raise the result."""
    return FileNotFoundError(f"{what} not found: {path}" + (f"; {fix}" if fix else ""))
