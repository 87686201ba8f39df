"""demo.scheduler: stages run on worker processes in dependency order; a failing stage stops the
run with its log; a graph that cannot finish is reported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from demo.scheduler import Stage, fingerprint, run_parallel

# each child appends its name to order.txt (after its dependencies finished), prints a tqdm-like
# line and leaves a marker file
CHILD = ("import sys, pathlib, time; out = pathlib.Path(sys.argv[1]); name = sys.argv[2]; time.sleep(0.2);"
         "print(name + ': 50%|#####     | 1/2', flush=True);"
         "open(out / 'order.txt', 'a').write(name + '\\n');"
         "sys.exit(3) if name == 'bad' else (out / (name + '.done')).write_text('ok')")


def _run(tmp_path: Path, graph: dict[str, tuple[str, ...]], jobs: int = 2) -> list[str]:
    stages = [Stage(name, deps, run=lambda: {}) for name, deps in graph.items()]
    finished: list[str] = []
    run_parallel(stages, set(), jobs, command=lambda name: [sys.executable, "-c", CHILD, str(tmp_path), name],
                 is_done=lambda name: (tmp_path / f"{name}.done").is_file(), on_done=finished.append,
                 log_dir=tmp_path / "logs", cwd=tmp_path)
    return finished


def test_stages_run_after_their_dependencies_and_log_their_output(tmp_path):
    graph = {"world": (), "judge_a": ("world",), "judge_b": ("world",), "mle": ("judge_a",), "eval": ("mle", "judge_b")}
    finished = _run(tmp_path, graph)
    assert sorted(finished) == sorted(graph)
    order = (tmp_path / "order.txt").read_text().split()
    for name, deps in graph.items():
        assert all(order.index(d) < order.index(name) for d in deps), order
    assert "1/2" in (tmp_path / "logs" / "mle.log").read_text()


def test_a_failing_stage_raises_with_its_log_and_nothing_after_it_runs(tmp_path):
    with pytest.raises(RuntimeError, match=r"stage 'bad' failed \(exit code 3\).*bad\.log"):
        _run(tmp_path, {"bad": (), "after": ("bad",)}, jobs=1)
    assert not (tmp_path / "after.done").exists()


def test_a_stage_that_needs_a_missing_stage_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="cannot run: missing dependencies"):
        _run(tmp_path, {"ok": (), "orphan": ("nowhere",)})


def test_fingerprint_changes_with_settings_and_dependencies():
    base = fingerprint(["sr", {"lr": 1e-4}], ["abc"])
    assert base == fingerprint(["sr", {"lr": 1e-4}], ["abc"]) and len(base) == 16
    assert base != fingerprint(["sr", {"lr": 2e-4}], ["abc"]) and base != fingerprint(["sr", {"lr": 1e-4}], ["abd"])
