"""ClipCap for transformers: configuration, model, processor, "image-to-text" pipeline (the files
that ship as remote code) and the checkpoint converters (``convert_clipcap``, ``convert_ndlb``).

:data:`AUTO_MAP` is the one definition of the Auto classes a saved folder loads with. Importing
this package registers, with transformers' own API:

- each class of ``AUTO_MAP`` with its Auto class in this process (``AutoModel.from_pretrained(path)``
  works here without remote code) and the pipeline with ``PIPELINE_REGISTRY``;
- the classes for ``register_for_auto_class`` (config, ``AutoModel``, ``AutoProcessor``), so that
  ``save_pretrained`` copies their code files beside the weights;
- a save hook of :class:`ClipCapPreTrainedModel` that writes all of ``AUTO_MAP`` and the pipeline's
  ``custom_pipelines`` entry into ``config.json`` and copies ``pipeline_clipcap.py``.

So a plain ``save_pretrained`` (train scripts, converters, Trainer checkpoints) writes what
``upload_model.py`` publishes, and the folder (or Hub repo) loads anywhere with any of these Auto
classes and ``trust_remote_code=True``, as does ``pipeline("image-to-text", model=...,
trust_remote_code=True)``. The model itself neither imports its pipeline nor edits its config.
"""

import os

import transformers
from transformers.dynamic_module_utils import custom_object_save

from .configuration_clipcap import ClipCapConfig
from .image_loading import to_rgb
from .modeling_clipcap import ClipCapForCaptioning, ClipCapPreTrainedModel, default_generation_config
from .pipeline_clipcap import ClipCapCaptioningPipeline, custom_pipelines_entry, register_clipcap_pipeline
from .processing_clipcap import ClipCapProcessor, caption_stop_token_ids

# The Auto classes a saved folder loads with under `trust_remote_code=True`, as every save writes
# them into its config.json: "<file>.<class>" of the remote-code files saved beside the weights.
AUTO_MAP = {
    "AutoConfig": "configuration_clipcap.ClipCapConfig",
    "AutoModel": "modeling_clipcap.ClipCapForCaptioning",
    "AutoModelForImageTextToText": "modeling_clipcap.ClipCapForCaptioning",
    "AutoProcessor": "processing_clipcap.ClipCapProcessor",
}


def write_remote_code_entries(model: ClipCapPreTrainedModel, save_directory: str | os.PathLike) -> None:
    """The save hook: `model`'s config lists every Auto class of AUTO_MAP and the "image-to-text"
    pipeline, and the pipeline's code file goes into `save_directory` (transformers copies the
    config's, model's and processor's own files)."""
    model.config.auto_map = dict(AUTO_MAP)
    model.config.custom_pipelines = custom_pipelines_entry()
    custom_object_save(ClipCapCaptioningPipeline, save_directory)


def _register_auto_classes() -> None:
    """Register each class of AUTO_MAP with its Auto class in this process, mark the classes for
    `register_for_auto_class`, register the pipeline and the save hook (once)."""
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
    register_clipcap_pipeline()  # pipeline("image-to-text", model=...) in this repository
    if write_remote_code_entries not in ClipCapPreTrainedModel.save_hooks:
        ClipCapPreTrainedModel.save_hooks.append(write_remote_code_entries)


_register_auto_classes()

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
    "write_remote_code_entries",
]
