"""ClipCap: CLIP prefix captioning as a transformers model.

Architecture (Mokady et al., 2021; "No Detail Left Behind", Sec. 4.1 "Model architecture"):
CLIP vision tower with projection → image embedding (512-d for ViT-B/32, not normalised) →
mapper → ``prefix_length`` GPT-2 input embeddings → GPT-2 continues them with the caption.

Decoding is the library's own `generate` (greedy, beam search, sampling, KV cache, logits
processors, stopping criteria): the prefix is handed to it as ``inputs_embeds``. A caption ends
after the first generated token that contains "." (the authors' stop rule), implemented by
listing those tokens as extra ``eos_token_id``s in the generation config.

``length_normalization="with_prefix"`` reproduces the beam search of the authors' release, which
ran under transformers 4.29 (nldb_hf_hosting `requirements.txt`, `model.py`): their stop rule is a
logits processor (after a stop token only end-of-text may follow), and 4.29 ranks a finished
hypothesis by its sum of log-probs / (prefix positions + kept tokens) and stops early by comparing
with the best candidate of the step. The library's beam search is kept; only two of its scoring
hooks (`_update_finished_beams`, `_check_early_stop_heuristic`) are overridden for that mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionModelWithProjection,
    GenerationConfig,
    GenerationMixin,
    GPT2LMHeadModel,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
)
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_clipcap import LENGTH_NORMALIZATIONS, ClipCapConfig


class EndAfterStopTokenLogitsProcessor(LogitsProcessor):
    """After a stop token, only `eos_token_id` may follow, at log-prob 0 (every other token gets the
    float minimum): the authors' `StopTokenLogitsProcessor` (nldb_hf_hosting `model.py`)."""

    def __init__(self, stop_token_ids: list[int], eos_token_id: int):
        self.stop_token_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long)
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == 0:  # first step after the prefix
            return scores
        after_stop = torch.isin(input_ids[:, -1], self.stop_token_ids.to(input_ids.device))  # (B,)
        forced = torch.full_like(scores, torch.finfo(scores.dtype).min)
        forced[:, self.eos_token_id] = 0.0
        return torch.where(after_stop[:, None], forced, scores)


@dataclass
class PrefixRanking:
    """What the "with_prefix" beam-scoring hooks need during one `generate` call."""

    prefix_length: int
    eos_token_ids: torch.Tensor
    best_candidate: torch.Tensor | None = None  # (B, 1) best accumulated log-prob of the last step


_PREFIX_RANKING: ContextVar[PrefixRanking | None] = ContextVar("clipcap_prefix_ranking", default=None)


@contextmanager
def prefix_ranking(prefix_length: int, eos_token_ids: list[int]) -> Iterator[PrefixRanking]:
    """Rank beams as transformers 4.29 did for the `generate` calls inside this block (this thread
    or task only)."""
    token = _PREFIX_RANKING.set(PrefixRanking(prefix_length, torch.tensor(eos_token_ids, dtype=torch.long)))
    try:
        yield _PREFIX_RANKING.get()
    finally:
        _PREFIX_RANKING.reset(token)


class ClipCapMLPMapper(nn.Module):
    """Linear → Tanh → Linear from one image embedding to ``prefix_length`` embeddings (paper Sec. 4.1)."""

    def __init__(self, config: ClipCapConfig):
        super().__init__()
        n_embd = config.text_config.n_embd
        self.prefix_length = config.prefix_length
        self.model = nn.Sequential(
            nn.Linear(config.clip_embed_dim, config.mapper_hidden_size),
            nn.Tanh(),
            nn.Linear(config.mapper_hidden_size, config.prefix_length * n_embd),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        prefix = self.model(image_embeds)  # (B, prefix_length * n_embd)
        return prefix.view(image_embeds.shape[0], self.prefix_length, -1)  # (B, P, n_embd)


class ClipCapAttention(nn.Module):
    """Multi-head self-attention of the original ClipCap mapper (queries and keys/values projected
    separately, no bias on those projections)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.to_queries(x).view(b, n, h, c // h).transpose(1, 2)  # (B, H, N, C/H)
        kv = self.to_keys_values(x).view(b, n, 2, h, c // h)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, N, C/H)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C/H)) v
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class ClipCapMapperMLP(nn.Module):
    """Feed-forward block of the transformer mapper (ReLU, ratio 2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ClipCapMapperLayer(nn.Module):
    """Pre-norm transformer layer of the original ClipCap mapper."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClipCapAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ClipCapMapperMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClipCapTransformerMapper(nn.Module):
    """The original ClipCap transformer mapper (Mokady et al., 2021, Sec. 3): the image embedding
    is projected to ``clip_length`` tokens, ``prefix_length`` learned constants are appended, and
    the transformer's outputs at the constants' positions are the prefix."""

    def __init__(self, config: ClipCapConfig):
        super().__init__()
        dim = config.text_config.n_embd
        self.clip_length = config.clip_length
        self.linear = nn.Linear(config.clip_embed_dim, config.clip_length * dim)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, dim))
        self.layers = nn.ModuleList(
            ClipCapMapperLayer(dim, config.mapper_num_heads) for _ in range(config.mapper_num_layers)
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        b = image_embeds.shape[0]
        x = self.linear(image_embeds).view(b, self.clip_length, -1)  # (B, clip_length, D)
        x = torch.cat([x, self.prefix_const.unsqueeze(0).expand(b, -1, -1)], dim=1)  # (B, clip_length + P, D)
        for layer in self.layers:
            x = layer(x)
        return x[:, self.clip_length :]  # (B, P, D)


class ClipCapPreTrainedModel(PreTrainedModel):
    config: ClipCapConfig
    config_class = ClipCapConfig
    base_model_prefix = "clipcap"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer", "GPT2Block", "ClipCapMapperLayer"]
    # Called as `hook(model, save_directory)` by `save_pretrained` before transformers writes the folder
    # (on the saving rank). In this repository `import modeling_clipcap` adds the one that writes the
    # folder's remote-code entries (`modeling_clipcap.AUTO_MAP`, the "image-to-text" pipeline and its
    # file). A process that loaded this file as remote code has none: its config keeps the entries, and
    # `pipeline.save_pretrained` (not the model's alone) copies the pipeline's file there.
    save_hooks: ClassVar[list[Callable[[PreTrainedModel, str | os.PathLike], None]]] = []

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        if self.save_hooks and kwargs.get("is_main_process", True) and not os.path.isfile(save_directory):
            os.makedirs(save_directory, exist_ok=True)
            for hook in self.save_hooks:
                hook(self, save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        from transformers import initialization as init

        super()._init_weights(module)
        if isinstance(module, ClipCapTransformerMapper):
            init.normal_(module.prefix_const, mean=0.0, std=1.0)
        elif isinstance(module, ClipCapForCaptioning) and module.logits_bias is not None:
            init.zeros_(module.logits_bias)


class ClipCapForCaptioning(ClipCapPreTrainedModel, GenerationMixin):
    """ClipCap image captioner: CLIP vision tower (frozen by default) → mapper → GPT-2.

    Example:

    ```python
    >>> import torch
    >>> from PIL import Image
    >>> from transformers import AutoModel, AutoProcessor
    >>> model = AutoModel.from_pretrained("path/or/repo", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("path/or/repo", trust_remote_code=True)
    >>> inputs = processor(images=Image.open("cat.jpg"), return_tensors="pt")
    >>> caption_ids = model.generate(**inputs)  # the model's defaults: 5 beams, stop after "."
    >>> processor.batch_decode(caption_ids)
    ```
    """

    # `generate` receives the prefix as `inputs_embeds`, which the library supports for models
    # whose main input is `input_ids`; images enter through `pixel_values`/`image_embeds`.
    main_input_name = "input_ids"

    def __init__(
        self,
        config: ClipCapConfig,
        vision_model: CLIPVisionModelWithProjection | None = None,
        language_model: GPT2LMHeadModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = vision_model or CLIPVisionModelWithProjection(config.vision_config)
        self.language_model = language_model or GPT2LMHeadModel(config.text_config)
        self.vision_model.config = config.vision_config
        self.language_model.config = config.text_config
        mapper_cls = ClipCapMLPMapper if config.mapping_type == "mlp" else ClipCapTransformerMapper
        self.mapper = mapper_cls(config)
        vocab_size = config.text_config.vocab_size
        self.logits_bias = nn.Parameter(torch.zeros(vocab_size)) if config.lm_head_bias else None
        if config.freeze_vision:
            self.vision_model.requires_grad_(False)
        self.post_init()
        self.generation_config = default_generation_config(config)

    @classmethod
    def from_clip_gpt2_pretrained(
        cls,
        clip_name_or_path: str = "openai/clip-vit-base-patch32",
        gpt2_name_or_path: str = "gpt2",
        **config_kwargs,
    ) -> ClipCapForCaptioning:
        """Build a captioner from a pretrained CLIP and GPT-2 with a freshly initialised mapper (the
        starting point of MLE pre-training, paper Sec. 4.2). `config_kwargs` go to `ClipCapConfig`
        (e.g. `prefix_length`, `mapping_type`, `stop_token_ids`)."""
        vision = CLIPVisionModelWithProjection.from_pretrained(clip_name_or_path)
        language = GPT2LMHeadModel.from_pretrained(gpt2_name_or_path)
        config = ClipCapConfig(
            vision_config=vision.config.to_dict(), text_config=language.config.to_dict(), **config_kwargs
        )
        return cls(config, vision_model=vision, language_model=language)

    # -- embeddings ---------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings after the visual projection, not normalised: (B, clip_embed_dim)."""
        dtype = self.vision_model.visual_projection.weight.dtype
        return self.vision_model(pixel_values=pixel_values.to(dtype)).image_embeds

    def get_prefix(
        self, pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The GPT-2 prefix for a batch of images: (B, prefix_length, n_embd)."""
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("Pass exactly one of `pixel_values` or `image_embeds`.")
        if image_embeds is None:
            image_embeds = self.get_image_embeds(pixel_values)
        mapper_dtype = next(self.mapper.parameters()).dtype
        return self.mapper(image_embeds.to(mapper_dtype))

    # -- forward / generate ---------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        With `pixel_values` or `image_embeds`, the image prefix is prepended to the caption tokens
        (`input_ids`); `labels` are the caption's token ids with -100 where no loss should be taken
        (the processor masks padding), and the prefix positions never count. Without an image the
        call goes straight to GPT-2 (the incremental decoding steps of `generate`).

        Returns a `CausalLMOutputWithPast` whose `logits` cover the prefix positions too:
        `logits[:, prefix_length - 1 + t]` predicts caption token `t`.

        Example:

        ```python
        >>> inputs = processor(images=images, text=["a cat on a couch."], return_tensors="pt")
        >>> out = model(**inputs)  # inputs hold pixel_values, input_ids, attention_mask, labels
        >>> out.loss.backward()
        ```
        """
        if pixel_values is not None or image_embeds is not None:
            prefix = self.get_prefix(pixel_values=pixel_values, image_embeds=image_embeds)  # (B, P, D)
            batch, prefix_len = prefix.shape[:2]
            if inputs_embeds is None and input_ids is not None:
                inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
            inputs_embeds = prefix if inputs_embeds is None else torch.cat([prefix, inputs_embeds], dim=1)
            if attention_mask is not None:
                ones = attention_mask.new_ones(batch, prefix_len)
                attention_mask = torch.cat([ones, attention_mask], dim=1)
            if labels is not None:
                ignore = labels.new_full((batch, prefix_len), -100)
                labels = torch.cat([ignore, labels], dim=1)
            input_ids = None

        outputs = self.language_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        logits = outputs.logits
        if self.logits_bias is not None:
            logits = logits + self.logits_bias.to(logits.dtype)

        loss = None
        if labels is not None:
            # Shifted next-token cross-entropy; -100 (prefix, padding) never counts.
            loss = ForCausalLMLoss(logits, labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        length_normalization: str | None = None,
        **generation_kwargs,
    ) -> torch.LongTensor:
        """Caption a batch of images with the library's decoding.

        Any `generate` argument works (`num_beams`, `do_sample`, `temperature`,
        `num_return_sequences`, `max_new_tokens`, `logits_processor`, `stopping_criteria`,
        `generation_config`, `return_dict_in_generate`...). Defaults come from
        `model.generation_config` (5 beams, 40 new tokens, stop after a token containing ".").
        `length_normalization` (default `config.length_normalization`): `"generated"` or
        `"with_prefix"` (the authors' release under transformers 4.29: stop tokens force
        end-of-text, finished beams ranked by sum log-prob / (prefix + caption tokens); see
        [`ClipCapConfig`]).
        Returns only the caption tokens, (B * num_return_sequences, T), padded with the pad token.

        Example:

        ```python
        >>> ids = model.generate(pixel_values=inputs["pixel_values"], num_beams=1)  # greedy
        >>> ids = model.generate(pixel_values=inputs["pixel_values"], do_sample=True, num_beams=1,
        ...                      temperature=0.3, num_return_sequences=4)
        ```
        """
        generation_kwargs.pop("input_ids", None)
        generation_kwargs.pop("attention_mask", None)
        generation_kwargs.pop("labels", None)
        mode = length_normalization or self.config.length_normalization
        if mode not in LENGTH_NORMALIZATIONS:
            raise ValueError(f"length_normalization must be one of {LENGTH_NORMALIZATIONS}, got {mode!r}.")
        prefix = self.get_prefix(pixel_values=pixel_values, image_embeds=image_embeds)  # (B, P, D)
        attention_mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if mode == "generated":
            return super().generate(inputs_embeds=prefix, attention_mask=attention_mask, **generation_kwargs)

        # "with_prefix": the stop tokens force end-of-text (instead of being eos ids themselves)
        eos = self.config.text_config.eos_token_id
        eos_ids = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
        if not eos_ids:
            raise ValueError('length_normalization="with_prefix" needs text_config.eos_token_id (the token that '
                             "ends a caption after a stop token).")
        generation_kwargs.setdefault("eos_token_id", eos_ids)
        if self.config.stop_token_ids:
            processors = LogitsProcessorList(generation_kwargs.pop("logits_processor", None) or [])
            processors.append(EndAfterStopTokenLogitsProcessor(self.config.stop_token_ids, eos_ids[0]))
            generation_kwargs["logits_processor"] = processors
        ends = generation_kwargs["eos_token_id"]
        with prefix_ranking(self.config.prefix_length, ends if isinstance(ends, list) else [ends]):
            return super().generate(inputs_embeds=prefix, attention_mask=attention_mask, **generation_kwargs)

    # -- beam-scoring hooks of `GenerationMixin._beam_search` ("with_prefix" mode only) ----------

    def _update_finished_beams(self, **kwargs):
        """transformers 4.29's hypothesis scores for the "with_prefix" mode: a candidate that ends
        with end-of-text is kept without it and scored sum log-prob / (prefix + kept tokens) ** lp;
        at the last step the `num_beams` best open beams are finished as well (4.29's `finalize`)."""
        ranking = _PREFIX_RANKING.get()
        if ranking is None:
            return super()._update_finished_beams(**kwargs)
        sequences = kwargs["topk_running_sequences"]  # (B, K, max_length)
        cur_len, log_probs = kwargs["cur_len"], kwargs["topk_log_probs"]  # (B, K), best first
        ranking.best_candidate = log_probs[:, :1].double()  # 4.29 stops early against the best candidate
        ends = torch.isin(sequences[:, :, cur_len], ranking.eos_token_ids.to(sequences.device))  # (B, K)
        kept = cur_len - kwargs["decoder_prompt_len"] + (~ends).long()  # 4.29 drops the end-of-text token
        lengths = (ranking.prefix_length + kept).double() ** kwargs["length_penalty"]
        hits, top_mask = kwargs["next_token_hits_stopping_criteria"], kwargs["top_num_beam_mask"]
        if cur_len + 1 >= sequences.shape[-1]:  # max length: the num_beams best open candidates finish too
            open_rank = (~ends).cumsum(dim=-1) - 1
            hits = hits & ((ends & top_mask[None, :]) | (~ends & (open_rank < kwargs["num_beams"])))
            top_mask = torch.ones_like(top_mask)
        kwargs.update(topk_log_probs=log_probs.double() / lengths, length_penalty=0.0,
                      next_token_hits_stopping_criteria=hits, top_num_beam_mask=top_mask)
        return super()._update_finished_beams(**kwargs)

    def _check_early_stop_heuristic(self, **kwargs):
        """transformers 4.29's early stop for the "with_prefix" mode: done when the worst kept
        hypothesis beats the step's best candidate over (prefix + current length) ** lp."""
        ranking = _PREFIX_RANKING.get()
        if ranking is not None and ranking.best_candidate is not None:
            kwargs.update(running_beam_scores=ranking.best_candidate,
                          decoder_prompt_len=kwargs["decoder_prompt_len"] - ranking.prefix_length)
        return GenerationMixin._check_early_stop_heuristic(**kwargs)


def default_generation_config(config: ClipCapConfig) -> GenerationConfig:
    """Generation defaults of the authors' release: 5 beams, at most 40 new tokens (their
    `max_length=50` counted the 10 prefix positions), and a caption ends after the first token
    containing "." (`config.stop_token_ids`) or at the end-of-text token."""
    text = config.text_config
    eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id]
    eos_ids = [i for i in dict.fromkeys([*eos, *config.stop_token_ids]) if i is not None]
    pad = text.pad_token_id if text.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    return GenerationConfig(
        num_beams=5,
        do_sample=False,
        max_new_tokens=40,
        bos_token_id=text.bos_token_id,
        eos_token_id=eos_ids or None,
        pad_token_id=pad,
    )


__all__ = [
    "ClipCapForCaptioning",
    "ClipCapPreTrainedModel",
    "EndAfterStopTokenLogitsProcessor",
    "default_generation_config",
    "prefix_ranking",
]
