"""OpenAI-compatible chat backend for Visual Caption Boost (vLLM, TGI, llama.cpp, Ollama ...).

Requests go to ``POST {base_url}/chat/completions`` with ``httpx.AsyncClient``; at most
``concurrency`` are in flight. Images travel as base64 ``data:`` URLs in an ``image_url``
content part of the last user turn. Transient failures (HTTP 429 and 5xx, connection errors,
timeouts, a 200 whose body is not the expected JSON) are retried with capped exponential
backoff plus jitter, or after the server's ``Retry-After``; the retries are counted per
reason. Each attempt has an overall deadline (``timeout``: connection, upload and the whole
answer), so a server that trickles its answer a byte at a time fails as a timeout and is retried.
Any other 4xx is a client error: not retried, reported with the COCO id, the status
and the server's own message.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import os
import random
import ssl
from datetime import datetime, timezone
from typing import Any, Sequence

import httpx

from .backends import Backend, GenRequest, GenResult

__all__ = ["OpenAIChatBackend", "backoff_delay", "parse_retry_after", "image_data_url", "RETRY_REASONS"]

#: Reasons a request is retried (keys of ``retry_counts``).
RETRY_REASONS = ("http_429", "http_5xx", "timeout", "connection", "malformed")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def backoff_delay(attempt: int, base: float, cap: float, jitter: float, rng: random.Random,
                  retry_after: float | None = None, retry_after_max: float = 300.0) -> float:
    """Wait before retry number ``attempt + 1``: the server's ``Retry-After`` when given (capped
    at ``retry_after_max``), else ``min(cap, base * 2**attempt)`` scaled by a uniform factor in
    ``[1 - jitter, 1]`` so that many clients do not retry in lock-step."""
    if retry_after is not None:
        return min(retry_after, retry_after_max)
    delay = min(cap, base * (2 ** attempt))
    return delay * (1.0 - jitter * rng.random())


def image_data_url(data: bytes) -> str:
    """A ``data:`` URL of an encoded image; formats servers may not read are re-encoded as PNG."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        mime = "image/png"
    elif data[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        mime = "image/gif"
    else:
        from PIL import Image

        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _server_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("msg")
            if msg:
                return str(msg)[:500]
        elif isinstance(err, str):
            return err[:500]
        if body.get("detail"):
            return str(body["detail"])[:500]
    return json.dumps(body)[:500]


class OpenAIChatBackend(Backend):
    """Text or vision chat through an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: the model name the server serves (``--served-model-name`` in vLLM).
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        api_key: bearer token; default the ``OPENAI_API_KEY`` environment variable (never logged).
        max_new_tokens, temperature, top_p, seed, stop: sampling settings sent with each request.
        extra_body: more JSON fields for the request (e.g. ``{"repetition_penalty": 1.1}`` for vLLM).
        concurrency: requests in flight at most.
        timeout: seconds per request attempt, overall (connect, upload and the whole answer).
        max_retries: retries per request before it fails.
        backoff_base, backoff_max, jitter: capped exponential backoff, see :func:`backoff_delay`.
        retry_after_max: longest ``Retry-After`` honoured (seconds).
        chunk_size: requests the pipeline hands over per call (default 4 x concurrency).
        rng_seed: seed of the jitter's random generator.
    """

    kind = "openai"

    def __init__(self, model: str, base_url: str = "http://127.0.0.1:8000/v1", api_key: str | None = None, *,
                 max_new_tokens: int = 160, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, extra_body: dict[str, Any] | None = None, concurrency: int = 16,
                 timeout: float = 120.0, max_retries: int = 8, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 jitter: float = 0.5, retry_after_max: float = 300.0, chunk_size: int | None = None,
                 rng_seed: int | None = None) -> None:
        super().__init__()
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0 and timeout > 0")
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.stop, self.extra_body = stop, dict(extra_body or {})
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.backoff_base, self.backoff_max, self.jitter = backoff_base, backoff_max, jitter
        self.retry_after_max = retry_after_max
        self.chunk_size = chunk_size or 4 * concurrency
        self._rng = random.Random(rng_seed)
        self._loop = asyncio.new_event_loop()
        self._clients: list[httpx.AsyncClient] = []
        self._ssl: ssl.SSLContext | None = None

    def settings(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model, "url": self.url, "max_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "stop": self.stop,
                "extra_body": self.extra_body, "concurrency": self.concurrency, "timeout": self.timeout,
                "max_retries": self.max_retries, "backoff_base": self.backoff_base, "backoff_max": self.backoff_max,
                "jitter": self.jitter}

    def payload(self, request: GenRequest) -> dict[str, Any]:
        """The JSON body of one request (image attached to the last user turn)."""
        messages: list[dict[str, Any]] = [dict(m) for m in request.messages]
        if request.image is not None:
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[last]["content"] = [
                {"type": "image_url", "image_url": {"url": image_data_url(request.image)}},
                {"type": "text", "text": messages[last]["content"]},
            ]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_new_tokens,
                                "temperature": self.temperature, "top_p": self.top_p}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = self.stop
        body.update(self.extra_body)
        return body

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        return self._loop.run_until_complete(self._generate(list(requests)))

    def _new_client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        if self._ssl is None:       # one TLS context for all workers (loading CA certificates takes ~50 ms)
            self._ssl = ssl.create_default_context()
        return httpx.AsyncClient(timeout=httpx.Timeout(self.timeout), limits=limits, headers=headers, verify=self._ssl)

    async def _generate(self, requests: list[GenRequest]) -> list[GenResult]:
        # `concurrency` workers, each with its own one-connection keep-alive client: httpx's
        # connection pool costs O(connections x waiting requests) per event, which dominated
        # the client's CPU time with one shared pool of 64 connections.
        results: list[GenResult | None] = [None] * len(requests)
        pending = iter(enumerate(requests))      # shared by the workers (one event loop: no race)
        while len(self._clients) < min(self.concurrency, len(requests)):
            self._clients.append(self._new_client())

        async def worker(client: httpx.AsyncClient) -> None:
            for i, request in pending:
                results[i] = await self._one(client, request)

        await asyncio.gather(*(worker(c) for c in self._clients[:len(requests)]))
        return results  # type: ignore[return-value]

    async def _one(self, client: httpx.AsyncClient, request: GenRequest) -> GenResult:
        """One request with its retries (the worker's slot stays taken while it backs off)."""
        body = self.payload(request)
        retries = 0
        while True:
            retry_after = None
            try:  # an overall deadline per attempt: httpx's timeouts bound each read, not the whole answer
                resp = await asyncio.wait_for(client.post(self.url, json=body), self.timeout)
            except (TimeoutError, httpx.TimeoutException) as e:
                reason, detail = "timeout", f"no complete answer within {self.timeout:g} s ({type(e).__name__})"
            except httpx.TransportError as e:
                reason, detail = "connection", f"{type(e).__name__}: {e}"
            else:
                status = resp.status_code
                if status == 200:
                    try:
                        choice = resp.json()["choices"][0]
                        text = choice["message"]["content"]
                        if not isinstance(text, str):
                            raise TypeError(f"message content is {type(text).__name__}, not str")
                        return GenResult(request.cocoid, text, choice.get("finish_reason"), retries)
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        reason, detail = "malformed", f"unexpected response body ({type(e).__name__}: {e})"
                elif status == 429 or status >= 500:
                    reason = "http_429" if status == 429 else "http_5xx"
                    detail = f"HTTP {status}: {_server_message(resp)}"
                    retry_after = parse_retry_after(resp.headers.get("retry-after"))
                else:
                    return GenResult(request.cocoid, retries=retries, error=(
                        f"HTTP {status} {resp.reason_phrase} from {self.url} (model {self.model!r}): "
                        f"{_server_message(resp)}. Client errors are not retried: check the model name, "
                        "--max-new-tokens against the context length, and the server log."))
            if retries >= self.max_retries:
                return GenResult(request.cocoid, retries=retries, error=(
                    f"gave up after {retries} retries against {self.url}; last failure: {reason}: {detail}"))
            await asyncio.sleep(backoff_delay(retries, self.backoff_base, self.backoff_max, self.jitter,
                                              self._rng, retry_after, self.retry_after_max))
            retries += 1
            self.retry_counts[reason] += 1

    def close(self) -> None:
        if self._loop.is_closed():
            return
        for client in self._clients:
            self._loop.run_until_complete(client.aclose())
        self._clients = []
        self._loop.close()
