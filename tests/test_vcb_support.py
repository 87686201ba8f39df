"""Shared helpers of the Visual Caption Boost tests (a tiny COCO dataset, a fake
OpenAI-compatible server with fault injection), plus tests of the helpers themselves.

Other ``tests/test_vcb_*.py`` files import from here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.tiny import COLOURS, PLACES, SHAPES, random_images

LLM = "test/llm"
VLM = "test/vlm"


# --------------------------------------------------------------------------- tiny COCO dataset
def coco_captions(cocoid: int, n: int = 5) -> list[str]:
    """Deterministic human-like captions of one id."""
    c, s, p = COLOURS[cocoid % len(COLOURS)], SHAPES[cocoid % len(SHAPES)], PLACES[cocoid % len(PLACES)]
    forms = [f"A {c} {s} {p}.", f"There is a {s} {p} of the picture.", f"A {c} shape number {cocoid}.",
             f"One {s} that is {c}.", f"A picture with a {c} {s}.", f"An extra caption of image {cocoid}."]
    return forms[:n]


def make_coco(root: Path, ids_by_split: dict[str, list[int]], fmt: str = "disk", n_captions: int = 5) -> Path:
    """A COCO dataset (docs/formats.md) under ``root``: PNG files on disk, an ``image`` column
    (datasets.Image), ``captions``, ``split``; saved with save_to_disk (fmt="disk") or as a
    parquet folder with a README configs block (fmt="parquet"). Returns the dataset path."""
    import datasets

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    all_ids = [i for ids in ids_by_split.values() for i in ids]
    for cid, img in zip(all_ids, random_images(len(all_ids), size=24, seed=len(all_ids))):
        img.save(root / "images" / f"{cid:012d}.png")
    features = datasets.Features({"cocoid": datasets.Value("int64"), "image": datasets.Image(),
                                  "captions": datasets.List(datasets.Value("string")), "split": datasets.Value("string")})
    dd = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({
            "cocoid": ids, "image": [str(root / "images" / f"{i:012d}.png") for i in ids],
            "captions": [coco_captions(i, n_captions) for i in ids], "split": [split] * len(ids)}, features=features)
        for split, ids in ids_by_split.items()})
    if fmt == "disk":
        out = root / "coco_hf"
        dd.save_to_disk(str(out))
        return out
    out = root / "coco_parquet"
    (out / "data").mkdir(parents=True)
    for split, ds in dd.items():
        ds.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    configs = "\n".join(f"  - split: {s}\n    path: data/{s}-*.parquet" for s in dd)
    (out / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}\n---\n")
    return out


def image_file_bytes(root: Path, cocoid: int) -> bytes:
    return (Path(root) / "images" / f"{cocoid:012d}.png").read_bytes()


# --------------------------------------------------------------------------- fake server answers
def fake_blend(captions: list[str]) -> str:
    """What the fake server's BlendCap answer becomes after clean-up."""
    return "; ".join(captions[:5])


def fake_visual(image: bytes) -> str:
    return f"In this image, there is a picture with digest {hashlib.sha256(image).hexdigest()[:10]}."


def fake_holistic(blend: str, visual: str) -> str:
    return f"{blend} | {visual}"


class FakeOpenAIServer:
    """A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions API.

    It validates the request shape (model, messages, roles, the few-shot layout of text
    requests, a base64 PNG ``image_url`` data URL in vision requests: 400 otherwise) and
    answers deterministically from the prompt, wrapped in chatter that the clean-up removes.

    Faults are injected by request number (1-based, over all POSTs): ``faults = {n: kind}``
    with kind in "500", "503", "429" (Retry-After 0), "429ra" (Retry-After: ``retry_after``),
    "timeout" (sleeps ``sleep_s`` before answering), "malformed" (200, not JSON),
    "malformed_shape" (200, JSON without choices), "disconnect" (closes without answering).
    ``client_error = (marker, status)`` answers that status to any request whose last user
    turn contains ``marker`` (checked after faults). ``latency_s`` delays every answer (to
    measure the client's concurrency).
    """

    def __init__(self, faults: dict[int, str] | None = None, client_error: tuple[str, int] | None = None,
                 always_500_marker: str | None = None, sleep_s: float = 1.5, retry_after: int = 1,
                 n_examples: int = 3, latency_s: float = 0.0) -> None:
        self.faults = dict(faults or {})
        self.client_error = client_error
        self.always_500_marker = always_500_marker
        self.sleep_s, self.retry_after, self.n_examples = sleep_s, retry_after, n_examples
        self.latency_s = latency_s   # simulated model time per answered request
        self.lock = threading.Lock()
        self.count = 0
        self.injected: list[tuple[int, str]] = []
        self.log: list[dict] = []   # one entry per POST: n, time, body digest, fault, status
        self.invalid: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"       # keep-alive, as real servers
            disable_nagle_algorithm = True      # headers and body go out without a 40 ms delayed-ACK stall

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server API
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAIServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- helpers
    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            pass  # the client gave up (timeout test)

    def _error(self, h, status: int, message: str, headers=None) -> None:
        self._send(h, status, json.dumps({"error": {"message": message, "type": "test_error", "code": status}}).encode(),
                   headers)

    def _validate(self, body: dict) -> tuple[str, bytes | None]:
        """The last user text and the image bytes; raises ValueError on a malformed request."""
        if body.get("model") not in (LLM, VLM):
            raise ValueError(f"unknown model {body.get('model')!r}")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("messages must be a non-empty list")
        if not isinstance(body.get("max_tokens"), int):
            raise ValueError("max_tokens missing")
        for m in msgs:
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"bad role {m.get('role')!r}")
        if msgs[-1]["role"] != "user":
            raise ValueError("last message must be the user's")
        content, image = msgs[-1]["content"], None
        if body["model"] == VLM:
            if not isinstance(content, list):
                raise ValueError("vision request without content parts")
            urls = [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
            texts = [p["text"] for p in content if p.get("type") == "text"]
            if len(urls) != 1 or len(texts) != 1:
                raise ValueError("vision request needs one image_url part and one text part")
            m = re.fullmatch(r"data:image/png;base64,([A-Za-z0-9+/=]+)", urls[0])
            if not m:
                raise ValueError("image_url is not a base64 PNG data URL")
            image = base64.b64decode(m.group(1), validate=True)
            if image[:4] != b"\x89PNG":
                raise ValueError("image is not a PNG")
            return texts[0], image
        if not isinstance(content, str):
            raise ValueError("text request with non-string content")
        roles = [m["role"] for m in msgs]
        expected = ["system"] + ["user", "assistant"] * self.n_examples + ["user"]
        if roles != expected:
            raise ValueError(f"few-shot layout {roles} != {expected}")
        return content, None

    def answer(self, text: str, image: bytes | None) -> str:
        """The raw (chatty) answer; clean-up turns it into fake_blend / fake_visual / fake_holistic."""
        if image is not None:
            return f"Sure! Here is a description of the image:\n\n{fake_visual(image)}\n\nI hope this helps!"
        caps = re.findall(r"^Reference caption \d+: (.*)$", text, flags=re.M)
        if caps:
            return f"Sure! Here is the caption:\n\n{fake_blend(caps)}\n\nNote: I removed redundant details."
        m = re.search(r"^Correct caption: (.*)\nNew noisy caption: (.*)$", text, flags=re.M | re.S)
        if m:
            return f"Assistant: {fake_holistic(m.group(1), m.group(2))}"
        raise ValueError("prompt matches no stage")

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        with self.lock:
            self.count += 1
            n = self.count
            fault = self.faults.get(n)
            if fault:
                self.injected.append((n, fault))
            entry = {"n": n, "time": time.monotonic(), "digest": hashlib.sha256(raw).hexdigest(), "fault": fault,
                     "auth": h.headers.get("Authorization")}
            self.log.append(entry)
        if h.path != "/v1/chat/completions":
            return self._error(h, 404, f"no route {h.path}")
        if fault in ("500", "503"):
            return self._error(h, int(fault), "injected server error")
        if fault == "429":
            return self._error(h, 429, "rate limited", {"Retry-After": "0"})
        if fault == "429ra":
            return self._error(h, 429, "rate limited", {"Retry-After": str(self.retry_after)})
        if fault == "disconnect":
            h.close_connection = True
            return None
        if fault == "malformed":
            return self._send(h, 200, b'{"choices": [{"message": {"content": "trunc')
        if fault == "malformed_shape":
            return self._send(h, 200, json.dumps({"object": "chat.completion", "choices": []}).encode())
        try:
            body = json.loads(raw)
            text, image = self._validate(body)
            answer = self.answer(text, image)
        except (ValueError, KeyError, TypeError) as e:
            self.invalid.append(str(e))
            return self._error(h, 400, f"invalid request: {e}")
        if self.client_error and self.client_error[0] in text:
            status = self.client_error[1]
            return self._error(h, status, f"This model's maximum context length is 32 tokens (status {status})")
        if self.always_500_marker and self.always_500_marker in text:
            return self._error(h, 500, "this prompt always fails")
        if fault == "timeout":
            time.sleep(self.sleep_s)
        elif self.latency_s:
            time.sleep(self.latency_s)
        resp = {"id": f"cmpl-{n}", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        return self._send(h, 200, json.dumps(resp).encode())


# --------------------------------------------------------------------------- tests of the helpers
def test_make_coco_formats_load_alike(tmp_path):
    from datasets_scripts.vcb import load_split

    ids = {"train": [5, 7, 9], "val": [11]}
    a = load_split(make_coco(tmp_path / "a", ids, "disk"), "train")
    b = load_split(make_coco(tmp_path / "b", ids, "parquet"), "train")
    assert a.ids == b.ids == [5, 7, 9]
    assert a.captions([9, 5]) == b.captions([9, 5]) == [coco_captions(9), coco_captions(5)]
    # the stored image bytes are the PNG files' bytes, whether embedded (disk) or path-backed (parquet)
    assert a.image_bytes([7]) == b.image_bytes([7]) == [image_file_bytes(tmp_path / "a", 7)]


def test_fake_server_validates_request_shape():
    with FakeOpenAIServer() as srv:
        url = srv.url + "/chat/completions"
        ok = httpx.post(url, json={"model": VLM, "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                + base64.b64encode(b"\x89PNG....").decode()}},
            {"type": "text", "text": "Briefly describe the content of the image."}]}]})
        assert ok.status_code == 200
        assert fake_visual(b"\x89PNG....") in ok.json()["choices"][0]["message"]["content"]
        no_image = httpx.post(url, json={"model": VLM, "max_tokens": 8, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
        assert no_image.status_code == 400 and "image_url" in no_image.json()["error"]["message"]
        wrong_model = httpx.post(url, json={"model": "x", "max_tokens": 8, "messages": [{"role": "user", "content": "a"}]})
        assert wrong_model.status_code == 400
        no_few_shot = httpx.post(url, json={"model": LLM, "max_tokens": 8, "messages": [
            {"role": "user", "content": "Reference caption 1: a"}]})
        assert no_few_shot.status_code == 400 and "few-shot" in no_few_shot.json()["error"]["message"]


@pytest.mark.parametrize("fault,status", [("500", 500), ("429ra", 429), ("malformed", 200)])
def test_fake_server_injects_by_request_number(fault, status):
    with FakeOpenAIServer(faults={2: fault}, retry_after=7) as srv:
        url = srv.url + "/chat/completions"
        bad = {"model": "x", "messages": []}
        first, second = httpx.post(url, json=bad), httpx.post(url, json=bad)
        assert first.status_code == 400 and second.status_code == status
        if fault == "429ra":
            assert second.headers["retry-after"] == "7"
        assert srv.injected == [(2, fault)]
