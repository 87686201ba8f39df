"""A local HTTP server on 127.0.0.1 whose answers trickle, for the overall-deadline tests (issue 17.1).

``DripServer`` answers every GET and POST with a 200 whose body arrives one byte every
``interval`` seconds (the headers too, with ``drip_headers=True``): each socket read succeeds
well within any per-read timeout, so only an overall deadline stops the client. Paths listed in
``files`` are served at once instead (``{"/good.png": bytes}``; with ``drip_requests=n`` only the
first n requests drip, whatever their path, and later ones are served from ``files``), and
``/big`` serves ``big_bytes`` bytes at once (with or without a Content-Length). Every answer stops after ``max_seconds`` (the
connection is closed), so that a client without a deadline still returns and its test fails
instead of hanging; leaving the ``with`` block stops the server and every answer in progress.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["DripServer"]


class DripServer:
    def __init__(self, interval: float = 0.5, drip_headers: bool = False, max_seconds: float = 30.0,
                 files: dict[str, bytes] | None = None, big_bytes: int = 0, big_length_header: bool = True,
                 drip_requests: int | None = None) -> None:
        self.interval, self.drip_headers, self.max_seconds = interval, drip_headers, max_seconds
        self.files = dict(files or {})
        self.big_bytes, self.big_length_header = big_bytes, big_length_header
        self.drip_requests = drip_requests
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.requests: list[tuple[str, float]] = []  # (path, time the request arrived)
        self.drip_ended: list[float] = []  # when each dripping answer stopped (client gone, stop, max_seconds)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the connection closes after each answer

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802 - http.server API
                server._answer(self)

            def do_POST(self):  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                server._answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "DripServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append((h.path, time.monotonic()))
            drip = (len(self.requests) <= self.drip_requests if self.drip_requests is not None
                    else h.path not in self.files and h.path != "/big")
        try:
            if not drip:
                body = self.files.get(h.path) or b"x" * self.big_bytes
                h.send_response(200)
                h.send_header("Content-Type", "application/octet-stream")
                if h.path in self.files or self.big_length_header:
                    h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
                return
            head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
            if not self.drip_headers:
                h.wfile.write(head)
                h.wfile.flush()
                head = b""
            body = head + b'{"choices": [' + b" " * 1_000_000
            started = time.monotonic()
            for byte in body:
                if self.stop.wait(self.interval) or time.monotonic() - started > self.max_seconds:
                    break
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client gave up: what a deadline does
        finally:
            if drip:
                self.drip_ended.append(time.monotonic())
