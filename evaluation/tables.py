"""Leaderboards as markdown / CSV (cells formatted by ``common.tables``)."""

from __future__ import annotations

import csv
import io
from typing import Any

from common import format_params, format_value

__all__ = ["leaderboard_columns", "leaderboard_markdown", "leaderboard_csv"]


def leaderboard_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table columns of several rows: their union, in the order they first appear."""
    return list(dict.fromkeys(k for row in rows for k in row["table"]))


def leaderboard_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown leaderboard: Model, Params, every table column, and the number of captions
    longer than the judge's text context (``>ctx``: CLIP reads only their start)."""
    cols = leaderboard_columns(rows)
    head = ["Model", "Params", *cols, ">ctx"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in rows:
        cells = [row["model"], format_params(row.get("params"))]
        cells += [format_value(c, row["table"].get(c)) for c in cols]
        cells.append(format_value("", row.get("over_context")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leaderboard_csv(rows: list[dict[str, Any]]) -> str:
    """The leaderboard as CSV (unrounded numbers; empty cells for no value)."""
    cols = leaderboard_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "kind", "params", *cols, "over_context", "captions_file"])
    for row in rows:
        values = ["" if row["table"].get(c) is None else row["table"][c] for c in cols]
        w.writerow([row["model"], row.get("kind", ""), row.get("params") or "", *values, row.get("over_context", ""),
                    row.get("captions_file", "")])
    return buf.getvalue()
