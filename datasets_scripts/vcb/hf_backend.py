"""Local ``transformers`` backends for Visual Caption Boost (paper Sec. 2, App. A.1).

:class:`TransformersChatBackend` runs any causal chat LLM through its tokenizer's chat
template (the paper: Mistral-7B-Instruct); :class:`TransformersVisionBackend` runs any
image-text-to-text model through its processor (the paper: InstructBLIP, whose processor takes
the bare prompt; chat VLMs such as LLaVA get their processor's chat template). Both batch with
left padding and decode only the new tokens; greedy decoding by default.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from .backends import Backend, GenRequest, GenResult, merge_system

__all__ = ["TransformersChatBackend", "TransformersVisionBackend", "resolve_device"]


def resolve_device(device: str = "auto", dtype: str = "auto"):
    """(torch.device, torch.dtype): "auto" = CUDA (bfloat16, or float16 without bf16) else CPU float32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        if dev.type == "cuda":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dt = torch.float32
    else:
        dt = getattr(torch, dtype)
    return dev, dt


def _is_template_error(e: Exception) -> bool:
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - jinja2 ships with transformers
        return False
    return isinstance(e, TemplateError)


class _HFBase(Backend):
    kind = "transformers"

    def _init_common(self, model: str, device: str, dtype: str, batch_size: int, max_new_tokens: int,
                     temperature: float, top_p: float, num_beams: int, repetition_penalty: float | None,
                     system_mode: str) -> None:
        super().__init__()
        if system_mode not in ("auto", "system", "merge"):
            raise ValueError(f"system_mode must be auto, system or merge, got {system_mode!r}")
        self.model = model
        self.device, self.dtype = resolve_device(device, dtype)
        self.batch_size = self.chunk_size = batch_size
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.num_beams, self.repetition_penalty, self.system_mode = num_beams, repetition_penalty, system_mode
        self.system_mode_used: str | None = None

    def _generation_config(self, lm, pad_token_id: int | None):
        gen = copy.deepcopy(lm.generation_config)
        sample = self.temperature > 0
        gen.max_new_tokens, gen.do_sample, gen.num_beams = self.max_new_tokens, sample, self.num_beams
        gen.temperature, gen.top_p = (self.temperature, self.top_p) if sample else (None, None)
        gen.top_k = gen.top_k if sample else None
        gen.max_length = None
        if self.repetition_penalty is not None:
            gen.repetition_penalty = self.repetition_penalty
        if pad_token_id is not None:
            gen.pad_token_id = pad_token_id
        return gen

    def _decode(self, out, input_ids, gen, tokenizer, requests: Sequence[GenRequest]) -> list[GenResult]:
        import torch

        n_in = input_ids.shape[1]
        # decoder-only models return prompt + new tokens; encoder-decoder ones only new tokens
        if out.shape[1] >= n_in and torch.equal(out[:, :n_in].to(input_ids.device), input_ids):
            out = out[:, n_in:]
        eos = gen.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        results = []
        for r, row, text in zip(requests, out.tolist(), texts):
            hit_eos = any(t in eos for t in row)
            reason = "length" if not hit_eos and len(row) >= self.max_new_tokens else "stop"
            results.append(GenResult(r.cocoid, text, reason))
        return results

    def settings(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model, "device": str(self.device), "dtype": str(self.dtype),
                "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens,
                "do_sample": self.temperature > 0, "temperature": self.temperature, "top_p": self.top_p,
                "num_beams": self.num_beams, "repetition_penalty": self.repetition_penalty,
                "system_mode": self.system_mode, "system_mode_used": self.system_mode_used}


class TransformersChatBackend(_HFBase):
    """A local chat LLM (``AutoModelForCausalLM`` + its tokenizer's chat template).

    Args:
        model: Hub id or folder (default the paper's Mistral-7B-Instruct-v0.2).
        device: "auto", "cpu", "cuda", "cuda:1" ...
        dtype: "auto" (bfloat16 on GPU, float32 on CPU) or a torch dtype name.
        batch_size: prompts per ``generate`` call.
        max_new_tokens, temperature, top_p, num_beams, repetition_penalty: decoding settings
            (temperature 0 = greedy).
        system_mode: "auto" sends a system message and, if the chat template rejects it, merges
            the system prompt into the first user turn; "system" / "merge" force one way.
        trust_remote_code: passed to ``from_pretrained``.
    """

    def __init__(self, model: str = "mistralai/Mistral-7B-Instruct-v0.2", *, device: str = "auto",
                 dtype: str = "auto", batch_size: int = 8, max_new_tokens: int = 160, temperature: float = 0.0,
                 top_p: float = 1.0, num_beams: int = 1, repetition_penalty: float | None = None,
                 system_mode: str = "auto", trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._init_common(model, device, dtype, batch_size, max_new_tokens, temperature, top_p, num_beams,
                          repetition_penalty, system_mode)
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer of {model} has no chat template; use an instruction/chat model or set "
                             "tokenizer.chat_template and save it")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype, trust_remote_code=trust_remote_code)
        self.lm.to(self.device).eval()
        self.gen = self._generation_config(self.lm, self.tokenizer.pad_token_id)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of one conversation, generation prompt included."""
        if self.system_mode == "merge":
            messages = merge_system(messages)
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            self.system_mode_used = self.system_mode_used or ("merge" if self.system_mode == "merge" else "system")
        except Exception as e:  # a template without system role raises a jinja2 TemplateError
            if self.system_mode != "auto" or not _is_template_error(e) or messages[0]["role"] != "system":
                raise
            text = self.tokenizer.apply_chat_template(merge_system(messages), tokenize=False,
                                                      add_generation_prompt=True)
            self.system_mode_used = "merge"
        return text

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        import torch

        results: list[GenResult] = []
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i:i + self.batch_size]
            texts = [self.render(r.messages) for r in batch]
            # the chat template already holds BOS and the like
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                out = self.lm.generate(**enc, generation_config=self.gen)
            results += self._decode(out, enc["input_ids"], self.gen, self.tokenizer, batch)
        return results


class TransformersVisionBackend(_HFBase):
    """A local image-text-to-text model (``AutoModelForImageTextToText`` + ``AutoProcessor``).

    Processors with a chat template (LLaVA, Qwen2-VL, ...) get the conversation with an image
    part before the text of the last user turn; processors without one (InstructBLIP, the
    paper's VLM) get the plain prompt: the user turn, after the system prompt if there is one.
    Arguments as :class:`TransformersChatBackend` (default model
    ``Salesforce/instructblip-vicuna-7b``).
    """

    def __init__(self, model: str = "Salesforce/instructblip-vicuna-7b", *, device: str = "auto",
                 dtype: str = "auto", batch_size: int = 8, max_new_tokens: int = 160, temperature: float = 0.0,
                 top_p: float = 1.0, num_beams: int = 1, repetition_penalty: float | None = None,
                 system_mode: str = "auto", trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self._init_common(model, device, dtype, batch_size, max_new_tokens, temperature, top_p, num_beams,
                          repetition_penalty, system_mode)
        self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.vlm = AutoModelForImageTextToText.from_pretrained(model, dtype=self.dtype,
                                                               trust_remote_code=trust_remote_code)
        self.vlm.to(self.device).eval()
        self.gen = self._generation_config(self.vlm, self.tokenizer.pad_token_id)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of one request (chat template, or the bare prompt)."""
        if not getattr(self.processor, "chat_template", None):
            self.system_mode_used = "plain-prompt"
            return "\n\n".join(m["content"] for m in merge_system(messages) if m["role"] == "user")
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        conv = [{"role": m["role"], "content": ([{"type": "image"}] if i == last else [])
                 + [{"type": "text", "text": m["content"]}]} for i, m in enumerate(messages)]
        if self.system_mode == "merge" and conv[0]["role"] == "system":
            conv = self._merge(conv)
        try:
            text = self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            self.system_mode_used = self.system_mode_used or ("merge" if self.system_mode == "merge" else "system")
        except Exception as e:
            if self.system_mode != "auto" or not _is_template_error(e) or conv[0]["role"] != "system":
                raise
            text = self.processor.apply_chat_template(self._merge(conv), tokenize=False, add_generation_prompt=True)
            self.system_mode_used = "merge"
        return text

    @staticmethod
    def _merge(conv: list[dict[str, Any]]) -> list[dict[str, Any]]:
        system = " ".join(p["text"] for p in conv[0]["content"] if p["type"] == "text")
        rest = [dict(m, content=list(m["content"])) for m in conv[1:]]
        for m in rest:
            if m["role"] == "user":
                idx = next(i for i, p in enumerate(m["content"]) if p["type"] == "text")
                m["content"][idx] = {"type": "text", "text": f"{system}\n\n{m['content'][idx]['text']}"}
                break
        return rest

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        import io

        import torch
        from PIL import Image

        results: list[GenResult] = []
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i:i + self.batch_size]
            missing = [r.cocoid for r in batch if r.image is None]
            if missing:
                raise ValueError(f"vision request without an image (cocoid {missing[0]})")
            images = [Image.open(io.BytesIO(r.image)).convert("RGB") for r in batch]
            texts = [self.render(r.messages) for r in batch]
            enc = self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.device)
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                out = self.vlm.generate(**enc, generation_config=self.gen)
            results += self._decode(out, enc["input_ids"], self.gen, self.tokenizer, batch)
        return results
