"""Local ``transformers`` backends for Visual Caption Boost (paper Sec. 2, App. A.1).

:class:`TransformersChatBackend` runs any causal chat LLM through its tokenizer's chat
template (the paper: Mistral-7B-Instruct); :class:`TransformersVisionBackend` runs any
image-text-to-text model (the paper: InstructBLIP, whose processor takes the bare prompt; chat
VLMs such as LLaVA get their processor's chat template) through the project's one "caption an
image with a VLM" implementation, :class:`evaluation.vlm.ImageTextToText`, which the evaluation
captioners use too. Both batch with left padding and decode only the new tokens; greedy decoding
by default.
"""

from __future__ import annotations

from typing import Any, Sequence

from evaluation.vlm import GenerationSettings, ImageTextToText, decode_new_tokens, render_chat

from .backends import Backend, GenRequest, GenResult, merge_system

__all__ = ["TransformersChatBackend", "TransformersVisionBackend", "device_and_dtype"]


def device_and_dtype(device: str = "auto", dtype: str = "auto"):
    """(torch.device, torch.dtype): device as :func:`metrics.clip_judge.resolve_device`; dtype
    "auto" = bfloat16 on CUDA (float16 without bf16), float32 on the CPU."""
    import torch

    from metrics.clip_judge import resolve_device

    dev = resolve_device(device)
    if dtype == "auto":
        if dev.type == "cuda":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dt = torch.float32
    else:
        dt = getattr(torch, dtype)
    return dev, dt


class _HFBase(Backend):
    kind = "transformers"

    def _init_common(self, model: str, device: str, dtype: str, batch_size: int, max_new_tokens: int,
                     temperature: float, top_p: float, num_beams: int, repetition_penalty: float | None,
                     system_mode: str) -> None:
        super().__init__()
        if system_mode not in ("auto", "system", "merge"):
            raise ValueError(f"system_mode must be auto, system or merge, got {system_mode!r}")
        self.model = model
        self.device, self.dtype = device_and_dtype(device, dtype)
        self.batch_size = self.chunk_size = batch_size
        self.generation = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                             num_beams=num_beams, repetition_penalty=repetition_penalty)
        self.system_mode = system_mode
        self.system_mode_used: str | None = None

    @property
    def max_new_tokens(self) -> int:
        return self.generation.max_new_tokens

    def settings(self) -> dict[str, Any]:
        g = self.generation
        return {"backend": self.kind, "model": self.model, "device": str(self.device), "dtype": str(self.dtype),
                "batch_size": self.batch_size, "max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample,
                "temperature": g.temperature, "top_p": g.top_p, "num_beams": g.num_beams,
                "repetition_penalty": g.repetition_penalty, "system_mode": self.system_mode,
                "system_mode_used": self.system_mode_used}


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
        self.gen = self.generation.config_for(self.lm, self.tokenizer.pad_token_id)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of one conversation, generation prompt included."""
        text, self.system_mode_used = render_chat(self.tokenizer, messages, self.system_mode, merge_system,
                                                  self.system_mode_used)
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
            decoded = decode_new_tokens(out, enc["input_ids"], self.gen, self.tokenizer, self.max_new_tokens)
            results += [GenResult(r.cocoid, text, reason) for r, (text, reason) in zip(batch, decoded)]
        return results


class TransformersVisionBackend(_HFBase):
    """A local image-text-to-text model (``AutoModelForImageTextToText`` + ``AutoProcessor``),
    run by :class:`evaluation.vlm.ImageTextToText`.

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
        self._init_common(model, device, dtype, batch_size, max_new_tokens, temperature, top_p, num_beams,
                          repetition_penalty, system_mode)
        self.runner = ImageTextToText(model, device=self.device, dtype=self.dtype, generation=self.generation,
                                      system_mode=system_mode, trust_remote_code=trust_remote_code)
        self.processor, self.tokenizer, self.vlm, self.gen = (self.runner.processor, self.runner.tokenizer,
                                                              self.runner.model, self.runner.gen)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of one request (chat template, or the bare prompt)."""
        text = self.runner.render(messages)
        self.system_mode_used = self.runner.system_mode_used
        return text

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        from metrics.image_loading import open_image

        results: list[GenResult] = []
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i:i + self.batch_size]
            missing = [r.cocoid for r in batch if r.image is None]
            if missing:
                raise ValueError(f"vision request without an image (cocoid {missing[0]})")
            prompts = [self.render(r.messages) for r in batch]
            answers = self.runner.generate([open_image(r.image) for r in batch], prompts)
            results += [GenResult(r.cocoid, text, reason) for r, (text, reason) in zip(batch, answers)]
        return results
