"""Small helpers every layer uses, written once: atomic JSON / text writes and JSON reads with
clear errors (`common.files`), the "<what> not found: <path>; <fix>" error (`common.errors`),
results-table cells and rows as the paper prints them (`common.tables`), and the Hub's dataset
size buckets (`common.hub`).

The lowest layer: it imports nothing of ours (only the standard library), so that any package may
import it. `modeling_clipcap/` (the remote code) still does not: it imports nothing of ours."""

from .errors import not_found
from .files import fsync_dir, json_safe, read_json, staged_dir, write_bytes, write_json, write_text
from .hub import size_category
from .tables import format_params, format_table, format_value, markdown_table

__all__ = ["not_found", "fsync_dir", "json_safe", "read_json", "write_bytes", "write_json", "write_text",
           "size_category", "format_params", "format_table", "format_value", "markdown_table"]
