"""Results as the paper's tables print them: one cell, one header + value row (plain or markdown),
parameter counts."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_params", "format_table", "format_value", "markdown_table"]


def format_value(column: str, value: Any) -> str:
    """A table cell: ``-`` for no value, integers as they are, ``mean len`` with 2 decimals, other
    numbers (R@1 and NLG scores in %) with 1."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool) or isinstance(value, int) or isinstance(value, str):
        return str(value)
    return f"{value:.2f}" if column == "mean len" else f"{value:.1f}"


def format_table(table: dict[str, float | int | None]) -> str:
    """One header row and one value row, like the paper's tables (R@1 and NLG scores in %)."""
    cells = [(k, format_value(k, v)) for k, v in table.items()]
    widths = [max(len(k), len(s)) for k, s in cells]
    head = " | ".join(k.rjust(w) for (k, _), w in zip(cells, widths))
    vals = " | ".join(s.rjust(w) for (_, s), w in zip(cells, widths))
    return f"{head}\n{'-' * len(head)}\n{vals}"


def markdown_table(table: dict[str, float | int | None]) -> str:
    """``format_table`` as a markdown table: a header row, a rule and one value row."""
    return "\n".join(["| " + " | ".join(table) + " |", "|" + "---|" * len(table),
                      "| " + " | ".join(format_value(k, v) for k, v in table.items()) + " |"])


def format_params(n: int | None) -> str:
    """A parameter count as the paper's Table 1 writes it (240M, 3.0B); ``-`` when unknown."""
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K" if n >= 1e3 else str(n)
