"""ClipCap for transformers: configuration, model, processor and checkpoint converters.

Importing this package registers the classes with the Auto classes, so that in this repository
``AutoModel.from_pretrained(path)`` works without remote code, and marks them for
``register_for_auto_class`` so that ``save_pretrained`` writes the code files and ``auto_map``:
a saved folder (or Hub repo) then loads anywhere with ``trust_remote_code=True``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_clipcap import ClipCapConfig
from .modeling_clipcap import ClipCapForCaptioning, ClipCapPreTrainedModel, default_generation_config
from .pipeline_clipcap import ClipCapCaptioningPipeline, register_clipcap_pipeline
from .processing_clipcap import ClipCapProcessor, caption_stop_token_ids, to_rgb

AutoConfig.register(ClipCapConfig.model_type, ClipCapConfig, exist_ok=True)
AutoModel.register(ClipCapConfig, ClipCapForCaptioning, exist_ok=True)
AutoModelForImageTextToText.register(ClipCapConfig, ClipCapForCaptioning, exist_ok=True)
AutoProcessor.register(ClipCapConfig, ClipCapProcessor, exist_ok=True)

ClipCapConfig.register_for_auto_class()
ClipCapForCaptioning.register_for_auto_class("AutoModel")
ClipCapProcessor.register_for_auto_class("AutoProcessor")
register_clipcap_pipeline()  # pipeline("image-to-text", model=...) in this repository

__all__ = [
    "ClipCapCaptioningPipeline",
    "ClipCapConfig",
    "ClipCapForCaptioning",
    "ClipCapPreTrainedModel",
    "ClipCapProcessor",
    "caption_stop_token_ids",
    "default_generation_config",
    "to_rgb",
]
