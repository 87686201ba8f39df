"""One captioning layer for any model: ClipCap, transformers VLMs, open_clip CoCa, OpenAI-compatible servers.

A :class:`Captioner` turns a batch of encoded images into one :class:`Caption` each. Build one
from a model spec (:func:`parse_model_spec`, :func:`load_captioner`)::

    clipcap:PATH_OR_ID          this repo's ClipCap format, or the authors' release (manu-gaur/NDLB)
    transformers:ID             any AutoModelForImageTextToText model with its processor
    open_clip:NAME[@TAG]        a CoCa model (coca_ViT-L-14@mscoco_finetuned_laion2B-s13B-b90k,
                                hf-hub:ORG/REPO, or a local folder with open_clip_config.json)
    openai:NAME@URL             a vision chat model behind an OpenAI-compatible server
                                (vLLM, TGI, llama.cpp, Ollama), e.g. llava@http://127.0.0.1:8000/v1

followed by ``?key=value&...`` to set this model's options (``prompt``, ``max_new_tokens``,
``num_beams``, ``batch_size``, ``dtype``, ``device``, ``name`` (its row name), ``params``,
``temperature``, ``trust_remote_code``, ``concurrency``, ``timeout``).

Prompts (transformers and openai): the default is a short-caption instruction
(:data:`DEFAULT_PROMPT`); ``prompt=visualcap`` is the paper's VisualCap prompt
(``datasets_scripts/prompts/visualcap.yaml``, NDLB App. A.1); any other text is sent as the user
turn. Models that caption without instruction (BLIP, GIT, vision-encoder-decoder) get no prompt
by default, PaliGemma its captioning task prefix ``caption en``. Answers of chat models are
cleaned with the VCB clean-up (``datasets_scripts.vcb.cleanup.clean_caption``: "Sure! Here is
..." and notes after the caption removed); the raw answer is kept too.

:meth:`Captioner.settings` is everything that decides the captions (model and its revision or
folder fingerprint, prompt, decoding settings, dtype): the caption cache is keyed by it.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import parse_qsl

__all__ = ["BACKENDS", "DEFAULT_PROMPT", "Caption", "Captioner", "ModelSpec", "parse_model_spec", "load_captioner",
           "ClipCapCaptioner", "TransformersCaptioner", "OpenClipCaptioner", "OpenAICaptioner", "prompt_messages"]

BACKENDS = ("clipcap", "transformers", "open_clip", "openai")
DEFAULT_PROMPT = "Describe the image in one short sentence."
#: model types that caption without an instruction (a text given to them is a caption prefix)
UNPROMPTED_MODEL_TYPES = ("blip", "git", "vision-encoder-decoder", "pix2struct")
#: model types with a captioning task prefix of their own
TASK_PROMPTS = {"paligemma": "caption en"}
_INT_OPTIONS = ("max_new_tokens", "num_beams", "batch_size", "params", "concurrency", "max_retries")
_FLOAT_OPTIONS = ("temperature", "top_p", "timeout", "repetition_penalty")
_OPTIONS = ("prompt", "dtype", "device", "name", "trust_remote_code", *_INT_OPTIONS, *_FLOAT_OPTIONS)


@dataclass
class Caption:
    """One model answer: the ``text`` scored, the ``raw`` answer, the ``finish_reason`` ("stop",
    "length" or None when unknown) and ``error`` (None on success)."""

    text: str = ""
    raw: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class ModelSpec:
    """A parsed model spec: ``kind``, ``name`` (id, path or served name), ``source`` (the URL of
    an openai server, or open_clip's pretrained tag) and per-model ``options``."""

    kind: str
    name: str
    source: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @property
    def display_name(self) -> str:
        """The leaderboard row name: ``name=`` if given, else the id (a local path's last part)."""
        if self.options.get("name"):
            return str(self.options["name"])
        name = self.name
        if os.path.isabs(name) or name.startswith(("./", "../", "~")):
            name = Path(name.rstrip("/")).name
        return name + (f"@{self.source}" if self.kind == "open_clip" and self.source else "")


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``KIND:NAME[@URL_OR_TAG][?key=value&...]`` (see the module docstring)."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in BACKENDS:
        raise ValueError(f"model spec {text!r}: start with one of {', '.join(k + ':' for k in BACKENDS)} "
                         "(e.g. transformers:llava-hf/llava-v1.6-34b-hf)")
    rest, _, query = rest.partition("?")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in _OPTIONS:
            raise ValueError(f"model spec {text!r}: unknown option {key!r}; known: {', '.join(_OPTIONS)}")
        try:
            options[key] = (int(value) if key in _INT_OPTIONS else float(value) if key in _FLOAT_OPTIONS
                            else value.lower() in ("1", "true", "yes") if key == "trust_remote_code" else value)
        except ValueError:
            raise ValueError(f"model spec {text!r}: option {key}={value!r} is not a number") from None
    name, source = rest, None
    if kind in ("openai", "open_clip") and "@" in rest:
        name, _, source = rest.partition("@")
    if not name:
        raise ValueError(f"model spec {text!r}: no model name after {kind}:")
    if kind == "openai" and not (source or "").startswith(("http://", "https://")):
        raise ValueError(f"model spec {text!r}: give the server as openai:NAME@URL "
                         "(e.g. openai:llava@http://127.0.0.1:8000/v1)")
    return ModelSpec(kind, name, source, options, text)


def prompt_messages(prompt: str | None) -> list[dict[str, str]]:
    """Chat messages of a prompt: ``"visualcap"`` is the VisualCap template, ``""`` no prompt,
    other text one user turn."""
    if prompt == "visualcap":
        from datasets_scripts.vcb.prompts import load_prompt

        return load_prompt("visualcap").messages()
    return [{"role": "user", "content": prompt}] if prompt else []


def _fingerprint(name: str) -> str | None:
    """For a local model folder: its files' names, sizes and modification times, hashed (a model
    retrained into the same folder is not served stale cached captions)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    h = hashlib.sha1()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _device_and_dtype(device: str | None, dtype: str | None):
    from metrics.clip_judge import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return dev, resolve_dtype(dtype or "auto", dev)


class Captioner(ABC):
    """A captioning model. Subclasses set ``kind``, ``name`` and ``batch_size`` and implement
    :meth:`caption` and :meth:`settings`."""

    kind: str = "abstract"
    name: str = ""
    batch_size: int = 16

    @abstractmethod
    def caption(self, images: Sequence[bytes]) -> list[Caption]:
        """One caption per encoded image, in order (a failed one has ``error`` set)."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that decides the captions (the caption cache's key)."""

    def num_parameters(self) -> int | None:
        """Parameter count (None when unknown, e.g. behind a server)."""
        return None

    def close(self) -> None:
        """Release memory / connections."""

    def __enter__(self) -> "Captioner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(images: Sequence[bytes]) -> list:
    from metrics.image_loading import open_image

    return [open_image(b) for b in images]


class ClipCapCaptioner(Captioner):
    """A ClipCap model in this repository's format or the authors' release layout (converted once,
    ``modeling_clipcap.convert_ndlb.ensure_converted``), decoded with its generation config (beam 5,
    at most 50 new tokens, stop after a token with ".") unless ``num_beams`` / ``max_new_tokens``."""

    kind = "clipcap"

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = "auto", batch_size: int = 16,
                 num_beams: int | None = None, max_new_tokens: int | None = None) -> None:
        import modeling_clipcap  # noqa: F401  (registers the Auto classes)
        from modeling_clipcap import ClipCapForCaptioning
        from modeling_clipcap.convert_ndlb import ensure_converted
        from transformers import AutoProcessor

        self.name, self.batch_size = model, batch_size
        self.device, self.dtype = _device_and_dtype(device, dtype)
        folder = ensure_converted(model)
        self.model = ClipCapForCaptioning.from_pretrained(folder).to(self.device, dtype=self.dtype).eval()
        self.processor = AutoProcessor.from_pretrained(folder)
        self.generate_kwargs = {k: v for k, v in {"num_beams": num_beams, "max_new_tokens": max_new_tokens}.items()
                                if v is not None}
        self._fingerprint = _fingerprint(folder)

    def caption(self, images: Sequence[bytes]) -> list[Caption]:
        import torch

        pixel_values = self.processor(images=_open(images))["pixel_values"].to(self.device, dtype=self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(pixel_values=pixel_values, **self.generate_kwargs)
        return [Caption(text, text) for text in self.processor.batch_decode(ids)]

    def settings(self) -> dict[str, Any]:
        gen = self.model.generation_config
        return {"backend": self.kind, "model": self.name, "fingerprint": self._fingerprint,
                "revision": getattr(self.model.config, "_commit_hash", None), "dtype": str(self.dtype),
                "generation": {"num_beams": self.generate_kwargs.get("num_beams", gen.num_beams),
                               "max_new_tokens": self.generate_kwargs.get("max_new_tokens", gen.max_new_tokens)}}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class TransformersCaptioner(Captioner):
    """Any ``AutoModelForImageTextToText`` model, run by :class:`evaluation.vlm.ImageTextToText`
    (greedy by default; ``max_new_tokens`` 60).

    Args:
        model: Hub id or folder.
        prompt: None = the default for the model type (see the module docstring), "" = none,
            "visualcap" = the VisualCap prompt, other text = the user turn.
    """

    kind = "transformers"

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = "auto", batch_size: int = 8,
                 prompt: str | None = None, max_new_tokens: int | None = None, num_beams: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float | None = None,
                 trust_remote_code: bool = False) -> None:
        from .vlm import GenerationSettings, ImageTextToText

        self.name, self.batch_size = model, batch_size
        device_, dtype_ = _device_and_dtype(device, dtype)
        generation = GenerationSettings(max_new_tokens=max_new_tokens or 60, num_beams=num_beams or 1,
                                        temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty)
        self.runner = ImageTextToText(model, device=device_, dtype=dtype_, generation=generation,
                                      trust_remote_code=trust_remote_code)
        if prompt is None:
            mt = self.runner.model_type
            prompt = "" if mt in UNPROMPTED_MODEL_TYPES else TASK_PROMPTS.get(mt, DEFAULT_PROMPT)
        self.prompt = prompt
        self.messages = prompt_messages(prompt)
        self.rendered = self.runner.render(self.messages)
        self._fingerprint = _fingerprint(model)

    def caption(self, images: Sequence[bytes]) -> list[Caption]:
        from datasets_scripts.vcb.cleanup import clean_caption

        answers = self.runner.generate(_open(images), [self.rendered] * len(images))
        clean = clean_caption if self.messages else str.strip
        return [Caption(clean(text), text, reason) for text, reason in answers]

    def settings(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.name, "fingerprint": self._fingerprint,
                "revision": getattr(self.runner.model.config, "_commit_hash", None), "dtype": str(self.runner.dtype),
                "prompt": self.messages, "rendered_prompt": self.rendered, "system_mode": self.runner.system_mode_used,
                "generation": self.runner.generation.as_dict(), "cleaned": bool(self.messages)}

    def num_parameters(self) -> int:
        return self.runner.num_parameters()


class _CoCaGenerator:
    """CoCa's text decoder under transformers' ``generate``.

    open_clip's own ``CoCa.generate`` needs ``transformers.BeamSearchScorer``, which transformers 5
    removed (open_clip then refuses to generate at all); its beam search is therefore run by
    transformers' decoding over CoCa's public ``forward(image, text, image_latent, image_embs)``
    (no KV cache: CoCa's decoder has none). open_clip's defaults are kept: start token 49406, end
    49407, pad 0, at least 5 tokens, at most 30 (``seq_len``), beam search; open_clip's 6 beams in 3
    groups without diversity penalty are 3 copies of the same 2-beam search, hence ``num_beams=2``.
    """

    def __init__(self, coca, vocab_size: int):
        from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
        from transformers.modeling_outputs import CausalLMOutput

        class Decoder(PreTrainedModel, GenerationMixin):
            config_class = PretrainedConfig
            main_input_name = "input_ids"

            def __init__(self, model):
                super().__init__(PretrainedConfig(vocab_size=vocab_size))
                self.coca = model

            def forward(self, input_ids, image_embs=None, image_latent=None, **kwargs):
                out = self.coca(None, input_ids, image_latent=image_latent, image_embs=image_embs, output_labels=False)
                return CausalLMOutput(logits=out["logits"])

            def prepare_inputs_for_generation(self, input_ids, image_embs=None, image_latent=None, **kwargs):
                return {"input_ids": input_ids, "image_embs": image_embs, "image_latent": image_latent}

        self.decoder = Decoder(coca).eval()

    def generate(self, image_latent, image_embs, sot: int, generation_config):
        import torch

        start = torch.full((image_embs.shape[0], 1), sot, dtype=torch.long, device=image_embs.device)
        return self.decoder.generate(input_ids=start, image_embs=image_embs, image_latent=image_latent,
                                     generation_config=generation_config)


class OpenClipCaptioner(Captioner):
    """An open_clip CoCa model (``coca_ViT-B-32``, ``coca_ViT-L-14`` + a pretrained tag,
    ``hf-hub:...`` or a local ``open_clip_config.json`` folder); see :class:`_CoCaGenerator` for
    the decoding (beam search, 2 beams, 5 to 30 tokens)."""

    kind = "open_clip"

    def __init__(self, model: str, pretrained: str | None = None, *, device: str | None = None,
                 dtype: str | None = "auto", batch_size: int = 16, num_beams: int | None = None,
                 max_new_tokens: int | None = None, repetition_penalty: float | None = None) -> None:
        import open_clip
        from transformers import GenerationConfig

        self.name, self.pretrained, self.batch_size = model, pretrained, batch_size
        self.device, self.dtype = _device_and_dtype(device, dtype)
        model_name = f"local-dir:{model}" if (Path(model) / "open_clip_config.json").is_file() else model
        coca, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        if not hasattr(coca, "text_decoder"):
            raise ValueError(f"open_clip model {model!r} is not a CoCa model (no text decoder): it cannot caption")
        self.model = coca.to(self.device, dtype=self.dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.sot = getattr(self.tokenizer, "sot_token_id", 49406)
        self.eot = getattr(self.tokenizer, "eot_token_id", 49407)
        self.generator = _CoCaGenerator(self.model, self.model.text_decoder.text_projection.shape[-1])
        self.gen = GenerationConfig(num_beams=num_beams or 2, max_new_tokens=max_new_tokens or 29, min_new_tokens=4,
                                    repetition_penalty=repetition_penalty or 1.0, do_sample=False, use_cache=False,
                                    bos_token_id=self.sot, eos_token_id=self.eot,
                                    pad_token_id=getattr(coca, "pad_id", 0))
        self._fingerprint = _fingerprint(model)

    def _decode(self, row: list[int]) -> str:
        row = row[1:] if row and row[0] == self.sot else row
        row = row[: row.index(self.eot)] if self.eot in row else row
        inner = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        text = inner.decode(row, skip_special_tokens=True) if inner is not None else self.tokenizer.decode(row)
        return text.strip()

    def caption(self, images: Sequence[bytes]) -> list[Caption]:
        import torch

        pixel_values = torch.stack([self.preprocess(im) for im in _open(images)]).to(self.device, dtype=self.dtype)
        with torch.inference_mode():
            encoded = self.model(pixel_values)
            out = self.generator.generate(encoded["image_features"], encoded["image_embs"], self.sot, self.gen)
        captions = []
        for row in out.tolist():
            text = self._decode(row)
            captions.append(Caption(text, text, "stop" if self.eot in row[1:] else "length"))
        return captions

    def settings(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.name, "pretrained": self.pretrained,
                "fingerprint": self._fingerprint, "dtype": str(self.dtype),
                "generation": {"num_beams": self.gen.num_beams, "max_new_tokens": self.gen.max_new_tokens,
                               "min_new_tokens": self.gen.min_new_tokens,
                               "repetition_penalty": self.gen.repetition_penalty}}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class OpenAICaptioner(Captioner):
    """A vision chat model behind an OpenAI-compatible ``/chat/completions`` server, through the
    VCB client (``datasets_scripts.vcb.openai_backend.OpenAIChatBackend``: an overall deadline per
    attempt, retries with backoff on 429 / 5xx / timeouts / bad answers, ``concurrency`` requests
    in flight). The API key is read from ``OPENAI_API_KEY``."""

    kind = "openai"

    def __init__(self, model: str, base_url: str, *, prompt: str | None = None, max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, concurrency: int = 16, timeout: float = 120.0,
                 max_retries: int = 8, params: int | None = None, batch_size: int | None = None) -> None:
        from datasets_scripts.vcb.openai_backend import OpenAIChatBackend

        self.name, self.params = model, params
        self.prompt = DEFAULT_PROMPT if prompt is None else prompt
        self.messages = prompt_messages(self.prompt)
        if not self.messages:
            raise ValueError(f"openai:{model}: a chat server needs a prompt (prompt= is empty)")
        self.client = OpenAIChatBackend(model, base_url, max_new_tokens=max_new_tokens or 60, temperature=temperature,
                                        top_p=top_p, concurrency=concurrency, timeout=timeout,
                                        max_retries=max_retries)
        self.batch_size = batch_size or self.client.chunk_size

    def caption(self, images: Sequence[bytes]) -> list[Caption]:
        from datasets_scripts.vcb.backends import GenRequest
        from datasets_scripts.vcb.cleanup import clean_caption

        results = self.client.generate([GenRequest(i, self.messages, image=b) for i, b in enumerate(images)])
        return [Caption(error=r.error) if r.error else Caption(clean_caption(r.text), r.text, r.finish_reason)
                for r in results]

    def settings(self) -> dict[str, Any]:
        c = self.client
        return {"backend": self.kind, "model": self.name, "url": c.url, "prompt": self.messages,
                "generation": {"max_tokens": c.max_new_tokens, "temperature": c.temperature, "top_p": c.top_p,
                               "seed": c.seed, "stop": c.stop, "extra_body": c.extra_body}, "cleaned": True}

    def num_parameters(self) -> int | None:
        return self.params

    def close(self) -> None:
        self.client.close()


def load_captioner(spec: ModelSpec | str, **defaults: Any) -> Captioner:
    """The captioner of a model spec; ``defaults`` (``device``, ``dtype``, ``batch_size``,
    ``prompt``, ``max_new_tokens``, ``num_beams``, ...) apply where the spec sets no option and the
    backend takes them (None values are ignored)."""
    import inspect

    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    cls = {"clipcap": ClipCapCaptioner, "transformers": TransformersCaptioner, "open_clip": OpenClipCaptioner,
           "openai": OpenAICaptioner}[spec.kind]
    accepted = inspect.signature(cls.__init__).parameters
    options = {k: v for k, v in defaults.items() if v is not None and k in accepted}
    for key, value in spec.options.items():
        if key == "name":
            continue
        if key not in accepted:
            raise ValueError(f"model spec {spec.text!r}: option {key!r} does not apply to {spec.kind} models")
        options[key] = value
    if spec.kind == "openai":
        return cls(spec.name, spec.source, **options)
    if spec.kind == "open_clip":
        return cls(spec.name, spec.source, **options)
    return cls(spec.name, **options)
