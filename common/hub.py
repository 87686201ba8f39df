"""What the Hugging Face Hub's metadata expects, computed once."""

from __future__ import annotations

__all__ = ["size_category"]

_SIZE_BUCKETS = tuple((10 ** e, f"{lo}<n<{hi}") for e, lo, hi in (
    (4, "1K", "10K"), (5, "10K", "100K"), (6, "100K", "1M"), (7, "1M", "10M"), (8, "10M", "100M"), (9, "100M", "1B"),
    (10, "1B", "10B"), (11, "10B", "100B"), (12, "100B", "1T")))


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket of a dataset with ``n`` rows (``n<1K``, ``1K<n<10K``, ...)."""
    if n < 1_000:
        return "n<1K"
    for limit, name in _SIZE_BUCKETS:
        if n < limit:
            return name
    return "n>1T"
