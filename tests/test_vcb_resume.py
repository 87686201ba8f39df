"""Scale and resumption of the VCB pipeline: SIGKILL at random moments and restart
gives every id exactly once; reruns skip finished ids; --limit/--ids/--shard select ids."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from datasets_scripts.vcb import (STAGES, EchoBackend, VCBError, load_prompt, load_split, parse_ids, parse_shard,
                                  StageSettings, read_records, run_stage, select_ids)
from tests.test_vcb_support import make_coco

REPO = Path(__file__).resolve().parent.parent
IDS = list(range(1000, 1040))


@pytest.fixture(scope="module")
def coco_path(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco"), {"train": IDS, "val": [7, 8]})


def _run_echo(data, out, stages=STAGES, model="echo", **kw):
    be = EchoBackend(model=model, chunk_size=4)
    return [run_stage(s, data, out, be, load_prompt(s), StageSettings(progress=False, **kw)) for s in stages]


def _all_lines(out: Path, stage: str) -> list[int]:
    """Every cocoid in every complete shard file (no de-duplication)."""
    ids = []
    for p in sorted((out / stage / "shards").glob("*.jsonl")):
        ids += [json.loads(line)["cocoid"] for line in p.read_text().splitlines() if line.strip()]
    return ids


def _n_shards(out: Path) -> int:
    return sum(len(list((out / s / "shards").glob("*.jsonl"))) for s in STAGES if (out / s / "shards").is_dir())


def test_sigkill_at_random_moments_then_resume_gives_each_id_once(coco_path, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "datasets_scripts.vcb", "run", "--dataset", str(coco_path), "--split", "train",
           "--out", str(out), "--backend", "echo", "--echo-delay", "0.01", "--shard-size", "3", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):
        target = _n_shards(out) + rng.randint(1, 6)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and _n_shards(out) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))      # somewhere in the next request / write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills == 4, "every run should have been killed mid-way"
    before = sum(len(_all_lines(out, s)) for s in STAGES if (out / s).is_dir())
    assert 0 < before < 3 * len(IDS)
    for s in STAGES:                      # nothing duplicated even between the kills
        if (out / s).is_dir():
            assert max(Counter(_all_lines(out, s)).values()) == 1

    final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "captions/s" in final.stderr

    # every id exactly once per stage, none lost, and the same text as an uninterrupted run
    ref = tmp_path / "ref"
    _run_echo(load_split(coco_path, "train"), ref)
    for s in STAGES:
        lines = _all_lines(out, s)
        assert sorted(lines) == IDS, s
        got, want = read_records(out / s), read_records(ref / s)
        assert {c: r["text"] for c, r in got.items()} == {c: r["text"] for c, r in want.items()}
        assert not list((out / s / "shards").glob(".*.part"))
    manifests = [json.loads(p.read_text()) for p in (out / "holisticcap" / "runs").glob("*.json")]
    finished = [m for m in manifests if m["status"] == "finished"]
    assert len(finished) == 1 and finished[0]["report"]["captions_per_s"] > 0


def test_rerun_skips_done_ids_and_limit_selects_first(coco_path, tmp_path):
    data = load_split(coco_path, "train")
    first = _run_echo(data, tmp_path, stages=("blendcap",), limit=5)[0]
    assert (first.selected, first.new, first.done_before) == (5, 5, 0)
    again = _run_echo(data, tmp_path, stages=("blendcap",), limit=5)[0]
    assert (again.new, again.done_before) == (0, 5)
    more = _run_echo(data, tmp_path, stages=("blendcap",), limit=8)[0]
    assert (more.new, more.done_before) == (3, 5)
    assert sorted(read_records(tmp_path / "blendcap")) == IDS[:8]


def test_shards_split_ids_disjointly(coco_path, tmp_path):
    data = load_split(coco_path, "train")
    for i in range(3):
        _run_echo(data, tmp_path / "out", stages=("blendcap",), shard=(i, 3))
    recs = read_records(tmp_path / "out" / "blendcap")
    assert sorted(_all_lines(tmp_path / "out", "blendcap")) == IDS      # disjoint and complete
    names = [p.name for p in (tmp_path / "out" / "blendcap" / "shards").glob("*.jsonl")]
    for i in range(3):
        writer_ids = {c for p in (tmp_path / "out" / "blendcap" / "shards").glob(f"s{i}of3-*.jsonl")
                      for c in (json.loads(x)["cocoid"] for x in p.read_text().splitlines())}
        assert writer_ids == {c for c in IDS if c % 3 == i}
    assert len(recs) == len(IDS) and len(set(names)) == len(names)


def test_ids_selection_and_parsing(coco_path, tmp_path):
    assert parse_ids("1003, 1001,1002") == [1003, 1001, 1002]
    f = tmp_path / "ids.txt"
    f.write_text("1005\n1004\n")
    assert parse_ids(f"@{f}") == [1005, 1004] and parse_ids(None) is None
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    with pytest.raises(ValueError):
        parse_shard("4/4")
    assert select_ids(IDS, [1003, 1001, 1003], limit=None) == [1003, 1001]
    assert select_ids(IDS, None, (1, 2), limit=3) == [1001, 1003, 1005]
    with pytest.raises(KeyError, match="999"):
        select_ids(IDS, [999])
    data = load_split(coco_path, "train")
    rep = _run_echo(data, tmp_path / "o", stages=("visualcap",), ids=[1003, 1001])[0]
    assert rep.new == 2 and sorted(read_records(tmp_path / "o" / "visualcap")) == [1001, 1003]


def test_holisticcap_needs_both_inputs(coco_path, tmp_path):
    data = load_split(coco_path, "train")
    alone = _run_echo(data, tmp_path, stages=("holisticcap",))[0]
    assert (alone.new, alone.missing_inputs) == (0, len(IDS))
    _run_echo(data, tmp_path, stages=("blendcap",), limit=6)
    _run_echo(data, tmp_path, stages=("visualcap",), limit=4)
    rep = _run_echo(data, tmp_path, stages=("holisticcap",))[0]
    assert (rep.new, rep.missing_inputs) == (4, len(IDS) - 4)
    h = read_records(tmp_path / "holisticcap")
    b, v = read_records(tmp_path / "blendcap"), read_records(tmp_path / "visualcap")
    assert h[IDS[0]]["text"] == f"{b[IDS[0]]['text']} {v[IDS[0]]['text']}"   # echo: BlendCap + VisualCap


def test_mixed_provenance_refused_unless_allowed(coco_path, tmp_path):
    data = load_split(coco_path, "train")
    _run_echo(data, tmp_path, stages=("blendcap",), model="model-a", limit=2)
    with pytest.raises(VCBError, match="model-b.*allow-mixed-provenance"):
        _run_echo(data, tmp_path, stages=("blendcap",), model="model-b", limit=4)
    rep = _run_echo(data, tmp_path, stages=("blendcap",), model="model-b", limit=4, allow_mixed_provenance=True)[0]
    assert rep.new == 2
    assert Counter(r["model"] for r in read_records(tmp_path / "blendcap").values()) == {"model-a": 2, "model-b": 2}


def test_stale_part_files_are_ignored_and_corrupt_shards_named(coco_path, tmp_path):
    data = load_split(coco_path, "train")
    shards = tmp_path / "blendcap" / "shards"
    shards.mkdir(parents=True)
    # a killed writer's half-written file (ours) and another machine's in-progress file
    (shards / ".s0of1-20260101T000000-abcdef-00000.jsonl.part").write_text('{"cocoid": 1000, "text": "x"}\n{"coc')
    (shards / ".s1of2-20260101T000000-abcdef-00000.jsonl.part").write_text('{"cocoid": 1001')
    rep = _run_echo(data, tmp_path, stages=("blendcap",), limit=3)[0]
    assert rep.new == 3 and rep.done_before == 0
    assert [p.name for p in shards.glob(".*.part")] == [".s1of2-20260101T000000-abcdef-00000.jsonl.part"]
    bad = shards / "s9of9-hand-edited.jsonl"
    bad.write_text('{"cocoid": 5}\nnot json\n')
    with pytest.raises(ValueError, match=r"s9of9-hand-edited.jsonl:2"):
        read_records(tmp_path / "blendcap")


def test_cli_help_and_bad_arguments(coco_path, tmp_path):
    from datasets_scripts.vcb.__main__ import build_parser, main

    args = build_parser().parse_args(["run", "--dataset", "d", "--out", "o", "--shard", "1/2", "--limit", "3"])
    assert (args.shard, args.limit, args.backend, args.stages) == ("1/2", 3, "transformers", "blendcap,visualcap,holisticcap")
    for sub in ("run", "export"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([sub, "--help"])
        assert e.value.code == 0
    old = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["run", "--dataset", str(coco_path), "--out", str(tmp_path), "--backend", "echo",
                     "--split", "nope", "--no-progress"]) == 2
        assert main(["run", "--dataset", str(tmp_path / "missing"), "--out", str(tmp_path), "--backend", "echo"]) == 2
        assert main(["run", "--dataset", str(coco_path), "--out", str(tmp_path), "--backend", "echo",
                     "--stages", "blendcap,nope"]) == 2
        assert main(["run", "--dataset", str(coco_path), "--out", str(tmp_path), "--backend", "echo",
                     "--stages", "visualcap", "--ids", "7", "--split", "val", "--no-progress"]) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
    assert list(read_records(tmp_path / "visualcap")) == [7]


def test_sigterm_saves_buffered_records_and_marks_run_interrupted(coco_path, tmp_path):
    """A polite kill (SIGTERM, Ctrl-C) writes what is buffered before exiting."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "datasets_scripts.vcb", "run", "--dataset", str(coco_path), "--out", str(out),
           "--backend", "echo", "--echo-delay", "0.02", "--shard-size", "1000", "--stages", "blendcap", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = out / "blendcap" / "runs"
    deadline = time.monotonic() + 60
    while not (runs.is_dir() and list(runs.glob("*.json"))) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)                            # some records are done, none written yet (shard size 1000)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rerun the same command to resume" in err
    saved = read_records(out / "blendcap")
    assert 0 < len(saved) < len(IDS)
    [manifest] = [json.loads(p.read_text()) for p in runs.glob("*.json")]
    assert manifest["status"] == "interrupted" and manifest["report"]["new"] == len(saved)


def test_visualcap_skips_rows_without_image(tmp_path):
    """COCO imports with missing files keep rows with image=None: VisualCap counts and skips them."""
    import datasets

    from tests.tiny import random_images

    paths = []
    for i, img in enumerate(random_images(2, size=16)):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    features = datasets.Features({"cocoid": datasets.Value("int64"), "image": datasets.Image(),
                                  "captions": datasets.List(datasets.Value("string")), "split": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"cocoid": [1, 2, 3], "image": [paths[0], None, paths[1]],
                                     "captions": [["a b c d"]] * 3, "split": ["train"] * 3}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "coco"))
    data = load_split(tmp_path / "coco", "train")
    rep = _run_echo(data, tmp_path / "out", stages=("visualcap",))[0]
    assert (rep.new, rep.missing_inputs, rep.status) == (2, 1, "finished")
    assert sorted(read_records(tmp_path / "out" / "visualcap")) == [1, 3]


def _manifests(stage_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((stage_dir / "runs").glob("*.json"))]


def test_sigkilled_run_leaves_a_manifest_with_current_counts_then_marked_killed(coco_path, tmp_path):
    """The manifest is rewritten after each shard: a SIGKILL leaves the counts and the retries of
    what was written; the next run marks it `killed` and finishes the work."""
    from tests.test_vcb_support import LLM, FakeOpenAIServer

    out = tmp_path / "run"
    stage_dir = out / "blendcap"
    with FakeOpenAIServer(faults={1: "500", 2: "429", 4: "503"}, latency_s=0.03) as srv:
        cmd = [sys.executable, "-m", "datasets_scripts.vcb", "run", "--dataset", str(coco_path), "--split", "train",
               "--out", str(out), "--stages", "blendcap", "--backend", "openai", "--llm", LLM,
               "--base-url", srv.url, "--concurrency", "1", "--timeout", "5", "--backoff-base", "0.01",
               "--shard-size", "2", "--no-progress"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and len(_all_lines(out, "blendcap")) < 6:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        on_disk = len(_all_lines(out, "blendcap"))
        [killed] = _manifests(stage_dir)
        assert 6 <= on_disk < len(IDS)
        assert killed["status"] == "running" and killed["pid"] == proc.pid
        # the counts of the last shard's manifest update (a kill may fall between a shard and its update)
        assert killed["report"]["written"] in (on_disk, on_disk - 2) and killed["report"]["written"] >= 4
        assert killed["report"]["new"] >= killed["report"]["written"]
        assert killed["report"]["retries"] == {"http_5xx": 2, "http_429": 1}

        final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "1 earlier run(s) ended without a final report (killed)" in final.stderr
    by_status = {m["status"]: m for m in _manifests(stage_dir)}
    assert set(by_status) == {"killed", "finished"}
    assert by_status["killed"]["report"]["retries"] == {"http_5xx": 2, "http_429": 1}
    assert by_status["finished"]["report"]["written"] == len(IDS) - on_disk
    assert sorted(_all_lines(out, "blendcap")) == IDS


def test_a_running_manifest_of_a_live_process_is_left_alone(coco_path, tmp_path):
    from datasets_scripts.vcb import mark_killed_runs

    data = load_split(coco_path, "train")
    _run_echo(data, tmp_path, stages=("blendcap",), limit=2)
    [path] = (tmp_path / "blendcap" / "runs").glob("*.json")
    manifest = json.loads(path.read_text())
    assert manifest["status"] == "finished" and manifest["report"]["written"] == 2
    manifest["status"] = "running"
    for pid, expected in [(os.getppid(), "running"), (2**22 + 12345, "killed")]:  # alive / no such process
        path.write_text(json.dumps({**manifest, "pid": pid}))
        mark_killed_runs(tmp_path / "blendcap")
        assert json.loads(path.read_text())["status"] == expected
