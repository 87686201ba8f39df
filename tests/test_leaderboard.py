"""The leaderboard of evaluate_captions.py --models (issue 18): one row per model (and per extra
captions file), each row's values equal to scoring that row's captions file directly; a run killed
while captioning resumes without captioning the finished images again."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate_captions as ec
from tests.test_vcb_support import VLM, FakeOpenAIServer, fake_visual
from tests.tiny_captioners import BENCH_IDS, benchmark_args, make_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_benchmark(tmp_path_factory.mktemp("bench"))


def test_leaderboard_rows_equal_scoring_each_captions_file(bench, tiny_clip_judge_dir, tiny_clipcap_dir, tmp_path,
                                                          capsys):
    from modeling_clipcap import ClipCapForCaptioning

    extra = tmp_path / "human.json"  # a captions file as a row; one caption longer than CLIP's 77 tokens
    extra.write_text(json.dumps({str(c): f"a red circle number {c}." for c in BENCH_IDS[:-1]}
                                | {str(BENCH_IDS[-1]): "a long caption " * 40}))
    judge = ["--judge", str(tiny_clip_judge_dir), "--device", "cpu"]
    out = tmp_path / "board"
    with FakeOpenAIServer() as srv:
        rc = ec.main(["--models", f"clipcap:{tiny_clipcap_dir}?num_beams=1&max_new_tokens=6&name=ClipCap",
                      f"openai:{VLM}@{srv.url}?params=7000000000", "--captions", str(extra), *benchmark_args(bench),
                      *judge, "--dtype", "float32", "--caption-cache", str(tmp_path / "cache"),
                      "--output-dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    board = json.loads((out / "leaderboard.json").read_text())
    rows = board["rows"]
    assert [r["model"] for r in rows] == ["ClipCap", VLM, "human"]
    assert board["benchmarks"] == ["clipscore", "nlg", "rd100", "truematch"]
    assert board["judge"] == str(tiny_clip_judge_dir)
    params = sum(p.numel() for p in ClipCapForCaptioning.from_pretrained(tiny_clipcap_dir).parameters())
    assert [r["params"] for r in rows] == [params, 7_000_000_000, None]
    assert [r["over_context"] for r in rows] == [0, 0, 1]
    # the openai row's captions are the server's answers for these images
    vlm_captions = json.loads(Path(rows[1]["captions_file"]).read_text())
    assert vlm_captions == {str(c): fake_visual((bench / "images" / f"{c}.png").read_bytes()) for c in BENCH_IDS}

    for row in rows:  # each row = evaluate_captions.py on that row's captions file
        direct = tmp_path / f"direct-{row['model'].replace('/', '_')}.json"
        argv = ["--captions", row["captions_file"], *benchmark_args(bench), *judge, "--output", str(direct)]
        assert ec.main(argv) == 0
        results = json.loads(direct.read_text())
        assert row["table"] == results["table"], row["model"]
        assert results["over_context"]["count"] == row["over_context"]
        assert json.loads(Path(row["results_file"]).read_text())["table"] == results["table"]
    assert set(rows[0]["table"]) == {"TM #3", "RD4", "ClipSc", "CLIP-S", "RefCLIP-S", "CIDEr", "BLEU-4", "vocab",
                                     "words>=5", "mean len"}

    md = (out / "leaderboard.md").read_text().splitlines()
    assert md[0].startswith("| Model | Params | TM #3 | RD4 | ClipSc |") and md[0].endswith("| >ctx |")
    assert len(md) == 2 + 3 and md[2].startswith("| ClipCap | ") and md[3].startswith(f"| {VLM} | 7.0B |")
    assert md[4].startswith("| human | - |") and md[4].endswith("| 1 |")
    assert "\n".join(md) in printed
    with open(out / "leaderboard.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == ["ClipCap", VLM, "human"]
    assert float(table[0]["TM #3"]) == pytest.approx(rows[0]["table"]["TM #3"])


def test_a_killed_leaderboard_run_resumes_without_recaptioning(bench, tmp_path):
    """SIGKILL while captioning (one image per request, 0.4 s each), then the same command again:
    only the images without a cached caption are sent to the server."""
    cache, out = tmp_path / "cache", tmp_path / "board"
    argv = ["--models", f"openai:{VLM}@URL?batch_size=1&concurrency=1", "--benchmark", "nlg", "--references",
            str(bench / "refs.json"), "--images", str(bench / "images"), "--caption-cache", str(cache),
            "--output-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with FakeOpenAIServer(latency_s=0.4) as srv:
        argv[1] = argv[1].replace("URL", srv.url)
        proc = subprocess.Popen([sys.executable, str(ROOT / "evaluate_captions.py"), *argv], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        lines = 0
        while time.monotonic() < deadline and proc.poll() is None:
            files = list(cache.glob("*.jsonl"))
            lines = len(files[0].read_text().splitlines()) if files else 0
            if lines >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert 2 <= lines, proc.stderr.read().decode()[-2000:]
        [cache_file] = cache.glob("*.jsonl")
        done = len(cache_file.read_text().splitlines())
        assert 2 <= done < len(BENCH_IDS) and not (out / "leaderboard.json").exists()
        with open(cache_file, "ab") as f:  # as if killed in the middle of writing a line
            f.write(b'{"image_sha256": "0123')
        sent = srv.count
        assert ec.main(argv) == 0
        assert srv.count - sent == len(BENCH_IDS) - done   # only the missing images were captioned
    [row] = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert row["captioning"] == {"images": 6, "cached": done, "captioned": 6 - done}
    captions = json.loads(Path(row["captions_file"]).read_text())
    assert captions == {str(c): fake_visual((bench / "images" / f"{c}.png").read_bytes()) for c in BENCH_IDS}
    assert len(cache_file.read_text().splitlines()) == len(BENCH_IDS)
