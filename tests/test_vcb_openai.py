"""The `openai` backend against a real local HTTP server that injects faults:
outputs are correct per id, the reported retries match the injected faults, Retry-After is
respected, client errors are reported with the id, status and server message."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from datasets_scripts.vcb import StageSettings, load_prompt, load_split, read_records, run_stage
from datasets_scripts.vcb.backends import GenRequest
from datasets_scripts.vcb.openai_backend import (OpenAIChatBackend, backoff_delay, image_data_url,
                                                 parse_retry_after)
from datasets_scripts.vcb.pipeline import VCBError
from tests.test_vcb_support import (LLM, VLM, FakeOpenAIServer, coco_captions, fake_blend, fake_holistic,
                                    fake_visual, image_file_bytes, make_coco)

IDS = list(range(100, 112))
FAST = dict(timeout=1.0, backoff_base=0.01, backoff_max=0.05, jitter=0.5, rng_seed=0)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return root, load_split(make_coco(root, {"train": IDS}), "train")


def _run_all(data, out, url, **kw):
    llm = OpenAIChatBackend(LLM, url, concurrency=4, **{**FAST, **kw})
    vlm = OpenAIChatBackend(VLM, url, concurrency=4, **{**FAST, **kw})
    try:
        reports = [run_stage(s, data, out, b, load_prompt(s), StageSettings(shard_size=5, progress=False))
                   for s, b in (("blendcap", llm), ("visualcap", vlm), ("holisticcap", llm))]
    finally:
        llm.close()
        vlm.close()
    return reports


def test_pipeline_survives_injected_faults_and_counts_retries(coco, tmp_path):
    root, data = coco
    # 3 stages x 12 ids = 36 answered requests; each fault adds one request, so all are reached
    faults = {2: "500", 3: "429", 5: "timeout", 8: "malformed", 11: "disconnect", 14: "503", 17: "429ra",
              20: "malformed_shape", 26: "timeout", 31: "500", 40: "429"}
    with FakeOpenAIServer(faults=faults, sleep_s=3.0, retry_after=1) as srv:
        reports = _run_all(data, tmp_path / "out", srv.url)
    assert not srv.invalid, srv.invalid
    assert [n for n, _ in srv.injected] == sorted(faults)        # every fault was served
    assert srv.count == 36 + len(faults)

    # outputs: correct per id, cleaned of the server's chatter
    recs = {s: read_records(tmp_path / "out" / s) for s in ("blendcap", "visualcap", "holisticcap")}
    for cid in IDS:
        blend, visual = fake_blend(coco_captions(cid)), fake_visual(image_file_bytes(root, cid))
        assert recs["blendcap"][cid]["text"] == blend
        assert recs["visualcap"][cid]["text"] == visual
        assert recs["holisticcap"][cid]["text"] == fake_holistic(blend, visual)
        assert recs["blendcap"][cid]["raw"].startswith("Sure! Here is the caption:")
        assert all(recs[s][cid]["flags"] == [] for s in recs)

    # retry counts: per reason, as injected
    expected = Counter({"http_5xx": 3, "http_429": 3, "timeout": 2, "malformed": 2, "connection": 1})
    reported = Counter()
    for r in reports:
        reported.update(r.retries)
    assert reported == expected
    assert sum(r["retries"] for s in recs for r in recs[s].values()) == len(faults)
    assert [r.new for r in reports] == [12, 12, 12] and all(r.failed == 0 for r in reports)

    # Retry-After: 1 was respected: the same body came back >= 1 s after the 429
    ra = next(e for e in srv.log if e["fault"] == "429ra")
    again = next(e for e in srv.log if e["n"] > ra["n"] and e["digest"] == ra["digest"])
    assert again["time"] - ra["time"] >= 0.95


@pytest.mark.parametrize("status", [400, 404])
def test_client_error_names_id_status_and_server_message(coco, tmp_path, status):
    _, data = coco
    bad_id = IDS[3]
    marker = coco_captions(bad_id)[2]      # unique to this id
    with FakeOpenAIServer(client_error=(marker, status)) as srv:
        llm = OpenAIChatBackend(LLM, srv.url, concurrency=2, chunk_size=4, **FAST)
        with pytest.raises(VCBError) as err:
            run_stage("blendcap", data, tmp_path / "out", llm, load_prompt("blendcap"),
                      StageSettings(shard_size=2, progress=False))
        msg = str(err.value)
        assert f"cocoid {bad_id}" in msg and f"HTTP {status}" in msg
        assert "maximum context length is 32 tokens" in msg and "not retried" in msg
        # a client error is never retried
        assert llm.retry_counts == Counter()
        # the other ids of the failing batch were saved; the ids before it too
        done = read_records(tmp_path / "out" / "blendcap")
        assert set(done) == set(IDS[:4]) - {bad_id}

        # on_error="skip": the run finishes, the id is listed as failed and left for a rerun
        report = run_stage("blendcap", data, tmp_path / "out", llm, load_prompt("blendcap"),
                           StageSettings(shard_size=2, on_error="skip", progress=False))
        llm.close()
    assert report.failed_ids == [bad_id] and report.status == "finished"
    assert set(read_records(tmp_path / "out" / "blendcap")) == set(IDS) - {bad_id}


def test_retries_exhausted_is_reported(coco, tmp_path):
    _, data = coco
    bad_id = IDS[0]
    with FakeOpenAIServer(always_500_marker=coco_captions(bad_id)[2]) as srv:
        llm = OpenAIChatBackend(LLM, srv.url, concurrency=2, max_retries=3, **FAST)
        with pytest.raises(VCBError, match=rf"cocoid {bad_id}.*gave up after 3 retries.*HTTP 500: this prompt always"):
            run_stage("blendcap", data, tmp_path / "out", llm, load_prompt("blendcap"),
                      StageSettings(ids=IDS[:3], progress=False))
        llm.close()
    assert llm.retry_counts == Counter({"http_5xx": 3})
    assert set(read_records(tmp_path / "out" / "blendcap")) == set(IDS[1:3])


def test_connection_refused_is_retried_then_reported(tmp_path):
    import socket

    with socket.socket() as s:     # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = OpenAIChatBackend(LLM, f"http://127.0.0.1:{port}/v1", max_retries=2, **FAST)
    [res] = llm.generate([GenRequest(7, [{"role": "user", "content": "x"}])])
    llm.close()
    assert res.error is not None and "gave up after 2 retries" in res.error and "connection" in res.error
    assert llm.retry_counts == Counter({"connection": 2}) and res.retries == 2


def test_backoff_delay_is_exponential_capped_jittered_and_respects_retry_after():
    rng = random.Random(0)
    no_jitter = [backoff_delay(a, 0.5, 4.0, 0.0, rng) for a in range(6)]
    assert no_jitter == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    jittered = [backoff_delay(3, 0.5, 100.0, 0.5, rng) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in jittered) and len(set(jittered)) > 100
    assert backoff_delay(0, 0.5, 4.0, 0.5, rng, retry_after=7.0) == 7.0
    assert backoff_delay(0, 0.5, 4.0, 0.5, rng, retry_after=900.0, retry_after_max=60.0) == 60.0


def test_parse_retry_after_seconds_and_http_date():
    from email.utils import format_datetime
    from datetime import datetime, timedelta, timezone

    assert parse_retry_after("3") == 3.0 and parse_retry_after("0") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 27 <= parse_retry_after(later) <= 30
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_payload_shape_text_and_vision():
    llm = OpenAIChatBackend(LLM, "http://127.0.0.1:9/v1", max_new_tokens=77, temperature=0.3, seed=5,
                            extra_body={"repetition_penalty": 1.1})
    msgs = load_prompt("visualcap").messages()
    body = llm.payload(GenRequest(1, msgs, image=b"\x89PNG\r\n\x1a\nabc"))
    llm.close()
    assert body["model"] == LLM and body["max_tokens"] == 77 and body["temperature"] == 0.3 and body["seed"] == 5
    assert body["repetition_penalty"] == 1.1
    [user] = body["messages"]
    assert user["content"][0] == {"type": "image_url", "image_url": {"url": image_data_url(b"\x89PNG\r\n\x1a\nabc")}}
    assert user["content"][1] == {"type": "text", "text": "Briefly describe the content of the image."}
    assert image_data_url(b"\xff\xd8\xff\xe0xx").startswith("data:image/jpeg;base64,")


def test_cli_openai_backend_wiring(coco, tmp_path, monkeypatch):
    """`run --backend openai` passes the server, concurrency, retry and body options through,
    sends the API key from the environment and never writes it to disk."""
    import json
    import signal

    from datasets_scripts.vcb.__main__ import main

    root, _ = coco
    monkeypatch.setenv("VCB_TEST_KEY", "sk-test-123")
    old = signal.getsignal(signal.SIGTERM)
    try:
        with FakeOpenAIServer(faults={1: "503"}) as srv:
            rc = main(["run", "--dataset", str(root / "coco_hf"), "--out", str(tmp_path), "--backend", "openai",
                       "--llm", LLM, "--vlm", VLM, "--base-url", srv.url, "--api-key-env", "VCB_TEST_KEY",
                       "--concurrency", "3", "--timeout", "2", "--max-retries", "2", "--backoff-base", "0.01",
                       "--extra-body", '{"top_k": 5}', "--limit", "4", "--no-progress"])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert rc == 0 and not srv.invalid
    assert {e["auth"] for e in srv.log} == {"Bearer sk-test-123"}
    for stage in ("blendcap", "visualcap", "holisticcap"):
        assert sorted(read_records(tmp_path / stage)) == IDS[:4]
        [m] = [json.loads(p.read_text()) for p in (tmp_path / stage / "runs").glob("*.json")]
        g = m["generation"]
        assert (g["backend"], g["concurrency"], g["timeout"], g["max_retries"], g["extra_body"]) == \
            ("openai", 3, 2.0, 2, {"top_k": 5})
        assert g["model"] == (VLM if stage == "visualcap" else LLM) and g["url"] == srv.url + "/chat/completions"
    assert sum(json.loads(p.read_text())["report"]["retries"].get("http_5xx", 0)
               for p in (tmp_path / "blendcap" / "runs").glob("*.json")) == 1
    assert not any("sk-test-123" in p.read_text() for p in tmp_path.rglob("*.json*"))


def test_trickling_answer_times_out_per_attempt_and_is_retried():
    """A server that sends one byte every 0.5 s never trips httpx's per-read timeout; each attempt
    still ends at `timeout` (overall), counts as a timeout and is retried."""
    import json
    import time

    from tests.slow_server import DripServer

    ok = json.dumps({"choices": [{"message": {"role": "assistant", "content": "A red square."},
                                  "finish_reason": "stop"}]}).encode()
    request = GenRequest(7, [{"role": "user", "content": "x"}])
    # the first attempt trickles, the retry is answered at once
    with DripServer(interval=0.5, max_seconds=20, files={"/v1/chat/completions": ok}, drip_requests=1) as srv:
        llm = OpenAIChatBackend(LLM, f"{srv.url}/v1", max_retries=2, **{**FAST, "timeout": 1.0})
        start = time.monotonic()
        [res] = llm.generate([request])
        elapsed = time.monotonic() - start
        llm.close()
    assert res.error is None and res.text == "A red square." and res.retries == 1
    assert llm.retry_counts == Counter({"timeout": 1}) and len(srv.requests) == 2
    assert elapsed < 3.0, elapsed
    # every attempt trickles: gives up after the retries, each attempt bounded
    with DripServer(interval=0.5, max_seconds=20) as srv:
        llm = OpenAIChatBackend(LLM, f"{srv.url}/v1", max_retries=1, **{**FAST, "timeout": 1.0})
        start = time.monotonic()
        [res] = llm.generate([request])
        elapsed = time.monotonic() - start
        llm.close()
    assert res.error is not None and "gave up after 1 retries" in res.error
    assert "timeout: no complete answer within 1 s" in res.error
    assert llm.retry_counts == Counter({"timeout": 1}) and elapsed < 4.0, elapsed
