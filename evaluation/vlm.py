"""Caption an image with a transformers vision-language model: the one implementation.

:class:`ImageTextToText` loads any ``AutoModelForImageTextToText`` model with its ``AutoProcessor``
(LLaVA / LLaVA-NeXT, Qwen2-VL / 2.5-VL, SmolVLM, PaliGemma, InstructBLIP, BLIP, GIT, ...) and
answers chat messages about a batch of images: left-padded batches, greedy decoding by default,
only the new tokens decoded. Used by the evaluation captioner (``evaluation.captioners``) and by
the VisualCap stage of Visual Caption Boost (``datasets_scripts/vcb/hf_backend.py``, NDLB Sec. 2,
App. A.1: InstructBLIP answering "Briefly describe the content of the image.").

How the prompt reaches the model:

- a processor with a chat template (LLaVA, Qwen2-VL, ...) gets the conversation, with an image
  part before the text of the last user turn, through ``apply_chat_template``;
- a processor without one (InstructBLIP, PaliGemma) gets the plain prompt: the user turns, after
  the system prompt if there is one;
- no messages at all: the processor gets the images alone (unconditional captioners: BLIP, GIT).

:class:`GenerationSettings` and :func:`decode_new_tokens` are shared with the VCB's text LLM
backend.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

__all__ = ["GenerationSettings", "ImageTextToText", "decode_new_tokens", "is_template_error",
           "merge_system_parts", "render_chat", "SYSTEM_MODES"]

SYSTEM_MODES = ("auto", "system", "merge")


@dataclass
class GenerationSettings:
    """Decoding settings applied on top of a model's own ``generation_config``.

    Args:
        max_new_tokens: longest answer in tokens.
        temperature: 0 = greedy (or beam search with ``num_beams`` > 1); above 0 = sampling.
        top_p: nucleus sampling threshold (sampling only).
        num_beams: beam width.
        repetition_penalty: transformers' repetition penalty (None: the model's default).
    """

    max_new_tokens: int = 160
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.temperature < 0:
            raise ValueError(f"need max_new_tokens >= 1, num_beams >= 1 and temperature >= 0, got {self}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "do_sample": self.do_sample}

    def config_for(self, model, pad_token_id: int | None):
        """A copy of ``model.generation_config`` with these settings."""
        gen = copy.deepcopy(model.generation_config)
        gen.max_new_tokens, gen.do_sample, gen.num_beams = self.max_new_tokens, self.do_sample, self.num_beams
        gen.temperature, gen.top_p = (self.temperature, self.top_p) if self.do_sample else (None, None)
        gen.top_k = gen.top_k if self.do_sample else None
        gen.max_length = None
        if self.repetition_penalty is not None:
            gen.repetition_penalty = self.repetition_penalty
        if pad_token_id is not None:
            gen.pad_token_id = pad_token_id
        return gen


def is_template_error(e: Exception) -> bool:
    """Whether ``e`` is a jinja2 error raised by a chat template (e.g. "System role not supported")."""
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - jinja2 ships with transformers
        return False
    return isinstance(e, TemplateError)


def render_chat(renderer: Any, conv: list[dict[str, Any]], system_mode: str,
                merge: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
                mode_used: str | None = None) -> tuple[str, str]:
    """``(prompt text, system mode used)`` of one conversation through ``renderer``'s (a tokenizer's
    or processor's) chat template, generation prompt included. ``system_mode`` "merge" moves the
    system turn into the first user turn first (with ``merge``); "auto" does so only when the
    template rejects a system role; ``mode_used`` is the mode an earlier call settled on (kept)."""
    if system_mode == "merge":
        conv = merge(conv)
    try:
        text = renderer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        return text, mode_used or ("merge" if system_mode == "merge" else "system")
    except Exception as e:  # a template without system role raises a jinja2 TemplateError
        if system_mode != "auto" or not is_template_error(e) or conv[0]["role"] != "system":
            raise
        return renderer.apply_chat_template(merge(conv), tokenize=False, add_generation_prompt=True), "merge"


def decode_new_tokens(out, input_ids, gen, tokenizer, max_new_tokens: int) -> list[tuple[str, str]]:
    """``(text, finish_reason)`` per row of ``generate``'s output: the prompt is cut off when the
    output starts with it (decoder-only models), the text decoded without special tokens; the
    finish reason is "length" when the row hit ``max_new_tokens`` without an eos token, else "stop"."""
    import torch

    if input_ids is not None:
        n_in = input_ids.shape[1]
        if out.shape[1] >= n_in and torch.equal(out[:, :n_in].to(input_ids.device), input_ids):
            out = out[:, n_in:]
    eos = gen.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    results = []
    for row, text in zip(out.tolist(), texts):
        hit_eos = any(t in eos for t in row)
        results.append((text, "length" if not hit_eos and len(row) >= max_new_tokens else "stop"))
    return results


def merge_system_parts(conv: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A chat conversation (content as parts) with its leading system turn moved into the text of
    the first user turn (for chat templates without a system role)."""
    if not conv or conv[0]["role"] != "system":
        return conv
    system = " ".join(p["text"] for p in conv[0]["content"] if p["type"] == "text")
    rest = [dict(m, content=list(m["content"])) for m in conv[1:]]
    for m in rest:
        if m["role"] == "user":
            idx = next(i for i, p in enumerate(m["content"]) if p["type"] == "text")
            m["content"][idx] = {"type": "text", "text": f"{system}\n\n{m['content'][idx]['text']}"}
            break
    return rest


def _plain_prompt(messages: list[dict[str, str]]) -> str:
    """The prompt of a processor without chat template: system prompt, then the user turns."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    return "\n\n".join([*system[:1], *users])


class ImageTextToText:
    """A local image-text-to-text model that answers chat messages about images.

    Args:
        model: Hub id or folder of an ``AutoModelForImageTextToText`` model with its processor.
        device: a torch device (or its name).
        dtype: the weights' dtype (resolved by the caller, e.g. with ``metrics.clip_judge.resolve_dtype``).
        generation: decoding settings.
        system_mode: "auto" sends a system message and, if the chat template rejects it, merges
            the system prompt into the first user turn; "system" / "merge" force one way.
        trust_remote_code: passed to ``from_pretrained``.

    Attributes:
        processor, tokenizer, model, gen (the ``GenerationConfig`` used), model_type,
        system_mode_used ("system", "merge", "plain-prompt" or "no-prompt" once a prompt was rendered).
    """

    def __init__(self, model: str, *, device, dtype, generation: GenerationSettings | None = None,
                 system_mode: str = "auto", trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if system_mode not in SYSTEM_MODES:
            raise ValueError(f"system_mode must be auto, system or merge, got {system_mode!r}")
        self.name, self.system_mode = str(model), system_mode
        self.device, self.dtype = torch.device(device), dtype
        self.generation = generation or GenerationSettings()
        self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype,
                                                                 trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self.model_type = getattr(self.model.config, "model_type", None)
        self.gen = self.generation.config_for(self.model, self.tokenizer.pad_token_id)
        self.system_mode_used: str | None = None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None))

    def render(self, messages: list[dict[str, str]] | None) -> str | None:
        """The prompt text for one conversation (chat template, plain prompt, or None for no prompt)."""
        if not messages:
            self.system_mode_used = "no-prompt"
            return None
        if not self.has_chat_template:
            self.system_mode_used = "plain-prompt"
            return _plain_prompt(messages)
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        conv = [{"role": m["role"], "content": ([{"type": "image"}] if i == last else [])
                 + [{"type": "text", "text": m["content"]}]} for i, m in enumerate(messages)]
        text, self.system_mode_used = render_chat(self.processor, conv, self.system_mode, merge_system_parts,
                                                  self.system_mode_used)
        return text

    def generate(self, images: Sequence, prompts: Sequence[str | None]) -> list[tuple[str, str]]:
        """``(answer, finish_reason)`` for each (RGB PIL image, rendered prompt) pair, one
        ``generate`` call for the whole batch (prompts all None, or all text)."""
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        if any(p is None for p in prompts) and not all(p is None for p in prompts):
            raise ValueError("a batch mixes prompted and unprompted requests; give every image a prompt or none")
        if prompts[0] is None:
            enc = self.processor(images=list(images), return_tensors="pt")
        else:
            enc = self.processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
        enc = enc.to(self.device)
        if "pixel_values" in enc and enc["pixel_values"].is_floating_point():
            enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=self.gen)
        return decode_new_tokens(out, enc.get("input_ids"), self.gen, self.tokenizer, self.generation.max_new_tokens)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
