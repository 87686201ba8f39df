"""Results tables: one row as the paper prints it, leaderboards as markdown / CSV / JSON, and
results written as strict JSON (NaN becomes null) atomically."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["format_value", "format_table", "format_params", "leaderboard_columns", "leaderboard_markdown",
           "leaderboard_csv", "json_safe", "write_json", "write_text"]


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


def format_params(n: int | None) -> str:
    """A parameter count as the paper's Table 1 writes it (240M, 3.0B); ``-`` when unknown."""
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K" if n >= 1e3 else str(n)


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


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON data: NaN / infinite numbers become None (JSON has no NaN: it is
    written null), numpy / torch scalars plain numbers, paths and other objects strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``json_safe(obj)`` to ``path`` atomically (fsynced temporary file, then rename)."""
    from datasets_scripts.vcb.store import write_json_atomic

    write_json_atomic(path, json_safe(obj))
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
