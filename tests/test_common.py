"""common/: atomic writes, JSON reads with clear errors, table cells, the Hub's size buckets."""

from __future__ import annotations

import json
import math

import pytest

from common import (format_params, format_table, format_value, json_safe, markdown_table, not_found, read_json,
                    size_category, write_bytes, write_json, write_text)


def test_write_json_is_strict_atomic_and_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "sub" / "r.json"
    write_json(out, {"a": math.nan, "b": (1, 2), 3: "é", "p": tmp_path})
    assert out.read_text(encoding="utf-8") == json.dumps(
        {"a": None, "b": [1, 2], "3": "é", "p": str(tmp_path)}, indent=2, ensure_ascii=False) + "\n"
    write_json(out, [[1, 2], [3]], indent=None)
    assert out.read_text() == "[[1, 2], [3]]\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    out = write_text(tmp_path / "t.md", "old\n")
    with pytest.raises(TypeError):
        write_bytes(out, "not bytes")  # type: ignore[arg-type]  # fails inside the write
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.md"]


def test_read_json_names_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"bag file not found: .*nope\.json; expected a list"):
        read_json(tmp_path / "nope.json", "bag file", "a list")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON \(.*\)$"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text('{"x": [1]}')
    assert read_json(tmp_path / "ok.json") == {"x": [1]}


def test_not_found_says_what_where_and_what_to_do():
    assert str(not_found("COCO dataset", "/x/coco", "build it with datasets_scripts.coco")) == (
        "COCO dataset not found: /x/coco; build it with datasets_scripts.coco")
    assert str(not_found("captions file", "c.json")) == "captions file not found: c.json"
    assert isinstance(not_found("a", "b"), FileNotFoundError)


def test_json_safe_turns_scalars_into_numbers():
    np = pytest.importorskip("numpy")
    assert json_safe({"x": np.float32(0.5), "y": [np.int64(3), math.inf]}) == {"x": 0.5, "y": [3, None]}


def test_table_cells_and_rows():
    assert [format_value("R@1", v) for v in (None, math.nan, 3, 12.345)] == ["-", "-", "3", "12.3"]
    assert format_value("mean len", 9.876) == "9.88"
    assert format_table({"R@1": 50.0, "mean len": 9.5}) == " R@1 | mean len\n---------------\n50.0 |     9.50"
    assert markdown_table({"R@1": 50.0, "n": 2}) == "| R@1 | n |\n|---|---|\n| 50.0 | 2 |"
    assert [format_params(n) for n in (None, 999, 12_000, 240_000_000, 3_000_000_000)] == ["-", "999", "12K",
                                                                                              "240M", "3.0B"]


@pytest.mark.parametrize("n, bucket", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (25_010, "10K<n<100K"),
                                       (100_000, "100K<n<1M"), (5_000_000, "1M<n<10M"), (10**7, "10M<n<100M")])
def test_size_category_is_the_hubs_bucket(n, bucket):
    assert size_category(n) == bucket
