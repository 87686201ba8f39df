"""Build a Visual Caption Boost backend by name (:data:`BACKENDS`).

The one module that knows every implementation: :mod:`.backends` defines the interface, the
implementations (:mod:`.hf_backend`, :mod:`.openai_backend`) import it, and this module imports
them (lazily: ``transformers`` and ``httpx`` load only for the backend asked for).
"""

from __future__ import annotations

from typing import Any

from .backends import Backend, EchoBackend

__all__ = ["BACKENDS", "make_backend"]

BACKENDS = ("transformers", "openai", "echo")


def make_backend(kind: str, model: str, *, vision: bool = False, **options: Any) -> Backend:
    """Build a backend by name. ``options`` are the backend's keyword arguments; unknown ones
    for the chosen backend are ignored (the CLI passes one set for all)."""
    import inspect

    if kind == "echo":
        cls: type = EchoBackend
    elif kind == "openai":
        from .openai_backend import OpenAIChatBackend as cls
    elif kind == "transformers":
        from .hf_backend import TransformersChatBackend, TransformersVisionBackend

        cls = TransformersVisionBackend if vision else TransformersChatBackend
    else:
        raise ValueError(f"unknown backend {kind!r}; choose one of {BACKENDS}")
    accepted = inspect.signature(cls.__init__).parameters
    return cls(model=model, **{k: v for k, v in options.items() if k in accepted and v is not None})
