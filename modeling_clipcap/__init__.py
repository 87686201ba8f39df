"""ClipCap for transformers: configuration, model, processor and checkpoint converters.

Importing this package registers the classes with every Auto class of
:data:`~modeling_clipcap.modeling_clipcap.AUTO_MAP` (AutoConfig, AutoModel,
AutoModelForImageTextToText, AutoProcessor), so that in this repository
``AutoModelForImageTextToText.from_pretrained(path)`` works without remote code. It also marks the
classes for ``register_for_auto_class``, so that ``save_pretrained`` writes the code files beside the
weights; the model writes ``AUTO_MAP`` into ``config.json``. A saved folder (or Hub repo) then loads
anywhere with any of these Auto classes and ``trust_remote_code=True``, as does
``pipeline("image-to-text", model=..., trust_remote_code=True)``.
"""

import transformers

from .configuration_clipcap import ClipCapConfig
from .modeling_clipcap import AUTO_MAP, ClipCapForCaptioning, ClipCapPreTrainedModel, default_generation_config
from .pipeline_clipcap import ClipCapCaptioningPipeline, register_clipcap_pipeline
from .image_loading import to_rgb
from .processing_clipcap import ClipCapProcessor, caption_stop_token_ids


def _register_auto_classes() -> None:
    """Register each class of AUTO_MAP with its Auto class in this process (the one definition)."""
    classes = {cls.__name__: cls for cls in (ClipCapConfig, ClipCapForCaptioning, ClipCapProcessor)}
    for auto_name, reference in AUTO_MAP.items():
        auto_class, cls = getattr(transformers, auto_name), classes[reference.rsplit(".", 1)[1]]
        if auto_class is transformers.AutoConfig:
            auto_class.register(ClipCapConfig.model_type, cls, exist_ok=True)
        else:
            auto_class.register(ClipCapConfig, cls, exist_ok=True)
    # what makes save_pretrained copy the code files (and write the processor's own auto_map)
    ClipCapConfig.register_for_auto_class()
    ClipCapForCaptioning.register_for_auto_class("AutoModel")
    ClipCapProcessor.register_for_auto_class("AutoProcessor")


_register_auto_classes()
register_clipcap_pipeline()  # pipeline("image-to-text", model=...) in this repository

__all__ = [
    "AUTO_MAP",
    "ClipCapCaptioningPipeline",
    "ClipCapConfig",
    "ClipCapForCaptioning",
    "ClipCapPreTrainedModel",
    "ClipCapProcessor",
    "caption_stop_token_ids",
    "default_generation_config",
    "to_rgb",
]
