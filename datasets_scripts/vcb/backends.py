"""The small interface every Visual Caption Boost model backend implements (paper Sec. 2).

A backend turns a list of :class:`GenRequest` (OpenAI-style chat messages, plus the encoded
image for VisualCap) into one :class:`GenResult` per request, in order. Implementations:

- ``transformers`` (:mod:`.hf_backend`): local chat LLMs (Mistral-7B-Instruct as in the paper)
  and image-text-to-text VLMs (InstructBLIP as in the paper), batched, CPU or GPU;
- ``openai`` (:mod:`.openai_backend`): any OpenAI-compatible chat server (vLLM, TGI,
  llama.cpp, Ollama), asynchronous with bounded concurrency, timeouts and retries;
- ``echo`` (:class:`EchoBackend`, here): a deterministic stand-in for dry runs and tests.

This module imports none of the implementations; :mod:`.registry` builds one by name.
"""

from __future__ import annotations

import hashlib
import re
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["GenRequest", "GenResult", "Backend", "EchoBackend", "merge_system"]


@dataclass
class GenRequest:
    """One model call.

    Attributes:
        cocoid: the COCO id it belongs to (named in errors).
        messages: OpenAI-style messages, ``{"role": "system"|"user"|"assistant", "content": str}``.
        image: the encoded image (PNG/JPEG bytes) that goes with the last user turn, or None.
    """

    cocoid: int
    messages: list[dict[str, str]]
    image: bytes | None = None


@dataclass
class GenResult:
    """A model answer: raw ``text``, the ``finish_reason`` ("stop", "length" or None when
    unknown), how many ``retries`` it took, and ``error`` (None on success)."""

    cocoid: int
    text: str = ""
    finish_reason: str | None = None
    retries: int = 0
    error: str | None = None


def merge_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move a leading system message into the first user turn (for templates without system)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            break
    return rest


class Backend(ABC):
    """A text or vision chat model. Subclasses set ``kind``, ``model`` and ``chunk_size`` (how
    many requests the pipeline hands over per call) and implement :meth:`generate`."""

    kind: str = "abstract"
    model: str = ""
    chunk_size: int = 8

    def __init__(self) -> None:
        self.retry_counts: Counter[str] = Counter()

    @abstractmethod
    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """One result per request, same order. Failures are returned with ``error`` set."""

    def settings(self) -> dict[str, Any]:
        """Generation settings recorded in the run manifest."""
        return {"backend": self.kind, "model": self.model}

    def close(self) -> None:
        """Release connections / memory."""


class EchoBackend(Backend):
    """Deterministic fake model for dry runs and tests (no model, no network).

    Text requests: the last user turn with the prompt's labels removed ("Reference caption 1:",
    "Correct caption:") and its lines joined, i.e. BlendCap = the human captions concatenated,
    HolisticCap = BlendCap + VisualCap. Vision requests: "An image of N bytes (sha256 ...)."

    Args:
        model: name recorded as the model.
        delay: seconds slept per request (to mimic a slow model).
        chunk_size: requests per pipeline call.
    """

    kind = "echo"

    def __init__(self, model: str = "echo", delay: float = 0.0, chunk_size: int = 8) -> None:
        super().__init__()
        self.model, self.delay, self.chunk_size = model, delay, chunk_size

    @staticmethod
    def answer(request: GenRequest) -> str:
        """The echo answer of one request."""
        if request.image is not None:
            return f"An image of {len(request.image)} bytes (sha256 {hashlib.sha256(request.image).hexdigest()[:12]})."
        last = [m for m in request.messages if m["role"] == "user"][-1]["content"]
        lines = [re.sub(r"^[^:\n]{1,40}:\s*", "", line).strip() for line in last.splitlines()]
        return " ".join(line for line in lines if line)

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        out = []
        for r in requests:
            if self.delay:
                time.sleep(self.delay)
            out.append(GenResult(r.cocoid, self.answer(r), "stop"))
        return out

    def settings(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model, "delay": self.delay}
