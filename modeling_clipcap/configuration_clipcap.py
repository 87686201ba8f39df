"""ClipCap configuration.

ClipCap (Mokady et al., 2021) maps one CLIP image embedding to ``prefix_length`` GPT-2 input
embeddings and lets GPT-2 continue them as a caption. "No Detail Left Behind" (Gaur et al., 2024,
Sec. 4.1) uses CLIP ViT-B/32 → a Tanh MLP (512 → 3840 → 7680) → 10 prefix tokens → GPT-2.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, GPT2Config, PreTrainedConfig

MAPPING_TYPES = ("mlp", "transformer")
LENGTH_NORMALIZATIONS = ("generated", "with_prefix")


class ClipCapConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ClipCapForCaptioning`] model.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower (with its projection). Defaults to CLIP ViT-B/32.
        text_config (`dict` or `GPT2Config`, *optional*):
            The GPT-2 language model. Defaults to GPT-2 small (124M).
        prefix_length (`int`, *optional*, defaults to 10):
            Number of prefix embeddings the mapper produces from one image embedding.
        mapping_type (`str`, *optional*, defaults to `"mlp"`):
            `"mlp"`: Linear → Tanh → Linear, hidden size `prefix_length * n_embd // 2` (the paper's
            512 → 3840 → 7680). `"transformer"`: the original ClipCap transformer mapper (a linear
            layer to `clip_length` tokens, `prefix_length` learned constants, `mapper_num_layers`
            transformer layers).
        clip_embed_dim (`int`, *optional*):
            Size of the image embedding fed to the mapper. Defaults to `vision_config.projection_dim`.
        mapper_hidden_size (`int`, *optional*):
            Hidden size of the MLP mapper. Defaults to `prefix_length * n_embd // 2`.
        clip_length (`int`, *optional*, defaults to 10):
            Transformer mapper only: number of tokens the image embedding is projected to.
        mapper_num_layers (`int`, *optional*, defaults to 8):
            Transformer mapper only: number of transformer layers.
        mapper_num_heads (`int`, *optional*, defaults to 8):
            Transformer mapper only: attention heads per layer.
        lm_head_bias (`bool`, *optional*, defaults to `False`):
            Add a learnable bias to the output logits (the authors' release has one, zero on the
            real vocabulary).
        freeze_vision (`bool`, *optional*, defaults to `True`):
            Freeze the CLIP vision tower (MLE pre-training and SR-L keep it frozen).
        stop_token_ids (`list[int]`, *optional*):
            Token ids that end a caption once generated (every token whose string contains ".", as
            in the authors' `StopTokenLogitsProcessor`). Used, with the eos token, as the
            generation `eos_token_id`.
        length_normalization (`str`, *optional*, defaults to `"generated"`):
            How beam search ranks finished captions. `"generated"`: sum of log-probs / generated tokens
            (the stop token included), as transformers >= 4.36 does. `"with_prefix"`: as the authors'
            release ran under the transformers 4.29 it pins: sum of log-probs / (`prefix_length` +
            caption tokens), with the stop rule applied as their `StopTokenLogitsProcessor` does (after
            a stop token only the end-of-text token may follow, at log-prob 0). `convert_ndlb` sets it;
            `generate(length_normalization=...)` overrides it per call.

    Example:

    ```python
    >>> from modeling_clipcap import ClipCapConfig, ClipCapForCaptioning
    >>> config = ClipCapConfig()  # CLIP ViT-B/32 + GPT-2 small + MLP mapper, 10 prefix tokens
    >>> model = ClipCapForCaptioning(config)  # random weights
    ```
    """

    model_type = "clipcap"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig, "text_config": GPT2Config}

    vision_config: dict | CLIPVisionConfig | None = None
    text_config: dict | GPT2Config | None = None
    prefix_length: int = 10
    mapping_type: str = "mlp"
    clip_embed_dim: int | None = None
    mapper_hidden_size: int | None = None
    clip_length: int = 10
    mapper_num_layers: int = 8
    mapper_num_heads: int = 8
    lm_head_bias: bool = False
    freeze_vision: bool = True
    stop_token_ids: list[int] | None = None
    length_normalization: str = "generated"
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.mapping_type not in MAPPING_TYPES:
            raise ValueError(f"mapping_type must be one of {MAPPING_TYPES}, got {self.mapping_type!r}.")
        if self.length_normalization not in LENGTH_NORMALIZATIONS:
            raise ValueError(f"length_normalization must be one of {LENGTH_NORMALIZATIONS}, got "
                             f"{self.length_normalization!r}.")
        if self.clip_embed_dim is None:
            self.clip_embed_dim = self.vision_config.projection_dim
        if self.mapper_hidden_size is None:
            self.mapper_hidden_size = self.prefix_length * self.text_config.n_embd // 2
        if self.stop_token_ids is None:
            self.stop_token_ids = []


__all__ = ["LENGTH_NORMALIZATIONS", "MAPPING_TYPES", "ClipCapConfig"]
