"""The ``"image-to-text"`` pipeline for ClipCap captioners ("No Detail Left Behind", Sec. 4.1).

transformers 5 has no stock ``"image-to-text"`` task any more, so this module provides one that
travels with the model: a published ClipCap folder holds this file and its config lists it under
``custom_pipelines``, and then, in any process,

```python
>>> from transformers import pipeline
>>> captioner = pipeline("image-to-text", model="user/clipcap-ndlb", trust_remote_code=True)
>>> captioner("cat.jpg")  # a PIL image, a path, an http(s) URL, or a list of them
[{'generated_text': 'two cats, one black and white and the other striped, are lying on a couch.'}]
>>> captioner(["a.jpg", "b.jpg"], num_beams=3, max_new_tokens=30, batch_size=2)
[[{'generated_text': ...}], [{'generated_text': ...}]]
```

The captions are exactly those of ``model.generate(pixel_values=processor(images=...)...)`` with the
same generation settings: the pipeline only loads the image, runs the model's processor, calls the
model's own ``generate`` and decodes with the processor. Generation arguments (``num_beams``,
``max_new_tokens``, ``do_sample``, ``num_return_sequences``, ``generation_config`` ...) are accepted
at construction, per call, or as ``generate_kwargs={...}``.

Images are opened by the project's one loader (``image_loading.py``, beside this file): RGB with
transparency composited on white, URLs read with an overall deadline (``timeout``, default 20 s)
and a size cap (``max_image_bytes``, default 50 MiB).

This file is remote code: it imports only numpy, torch, transformers and its sibling
``image_loading.py`` (never the rest of the repository), so that ``trust_remote_code=True`` can
load it in a process that has never seen this project. Every ``save_pretrained`` of the model in
this repository (the save hook that ``import modeling_clipcap`` registers) and
:meth:`ClipCapCaptioningPipeline.save_pretrained` put both files beside the model and write the
config entry (:func:`custom_pipelines_entry`); the model's own file does not import this one.

In this repository, with a model object at hand, build the pipeline directly
(``ClipCapCaptioningPipeline(model=model, processor=processor)``) or pass
``pipeline_class=ClipCapCaptioningPipeline``: transformers 5 redirects the bare task name
``"image-to-text"`` to its ``"image-text-to-text"`` pipeline unless the model's config lists the
task in ``custom_pipelines``. ``import modeling_clipcap`` also registers the class with
``PIPELINE_REGISTRY`` (:func:`register_clipcap_pipeline`), which is what makes
``Pipeline.save_pretrained`` / ``push_to_hub`` write ``custom_pipelines``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, Pipeline

from .image_loading import open_image

TASK = "image-to-text"
# Arguments that go to `generate` besides the GenerationConfig fields.
_EXTRA_GENERATE_ARGS = {"generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                        "synced_gpus", "assistant_model", "streamer", "negative_prompt_ids",
                        "negative_prompt_attention_mask"}


def _generation_keys() -> set[str]:
    return {k for k in vars(GenerationConfig()) if not k.startswith("_")} | _EXTRA_GENERATE_ARGS


class ClipCapCaptioningPipeline(Pipeline):
    """Caption images with a ClipCap model (`ClipCapForCaptioning` + `ClipCapProcessor`).

    Call it with one image (PIL image, path or URL) to get ``[{"generated_text": caption}]`` (one
    dict per returned sequence, see ``num_return_sequences``), or with a list of images to get one
    such list per image. Keyword arguments:

    - any `generate` argument (``num_beams``, ``max_new_tokens``, ``do_sample``, ``temperature``,
      ``num_return_sequences``, ``generation_config`` ...), or ``generate_kwargs={...}``; the
      model's `generation_config` (5 beams, stop after ".") fills in the rest;
    - ``timeout``: overall deadline of an image URL download in seconds (default 20);
    - ``max_image_bytes``: largest image URL download (default 50 MiB);
    - ``batch_size`` (per call or at construction): images per `generate` call.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True

    def __init__(self, *args: Any, **kwargs: Any):
        # `pipeline("image-to-text", ..., pipeline_class=...)` renames the task (transformers 5 redirects the
        # removed stock task to "image-text-to-text"); this pipeline is the image-to-text one.
        kwargs["task"] = TASK
        super().__init__(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the model, the processor, this file and the config's `custom_pipelines` entry, so that
        `pipeline("image-to-text", model=save_directory, trust_remote_code=True)` loads this pipeline
        (`push_to_hub` goes through here too)."""
        from transformers.dynamic_module_utils import custom_object_save

        self.model.config.custom_pipelines = custom_pipelines_entry()
        super().save_pretrained(save_directory, **kwargs)  # model (+ custom_pipelines), tokenizer, image processor
        custom_object_save(self, save_directory)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)

    def __call__(self, inputs: Any = None, **kwargs: Any) -> list:
        if "images" in kwargs:  # the old stock pipeline's keyword
            if inputs is not None:
                raise ValueError("Pass the images either positionally or as `images=`, not both.")
            inputs = kwargs.pop("images")
        if inputs is None:
            raise ValueError("No image given: call the pipeline with an image, a path, a URL or a list of them.")
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list) and not inputs:
            return []
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, generate_kwargs: dict | None = None, timeout: float | None = None,
                             max_image_bytes: int | None = None, **kwargs):
        preprocess_params: dict[str, Any] = {}
        forward_params: dict[str, Any] = {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if max_image_bytes is not None:
            preprocess_params["max_image_bytes"] = max_image_bytes
        # per-call generate_kwargs add to (not replace) those given at construction
        generation = {**getattr(self, "_forward_params", {}).get("generate_kwargs", {}), **(generate_kwargs or {})}
        known = _generation_keys()
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {unknown}; it takes generation "
                            "arguments (num_beams, max_new_tokens, ...), generate_kwargs, timeout, max_image_bytes and "
                            "batch_size.")
        for key, value in kwargs.items():
            if key in (generate_kwargs or {}) and generate_kwargs[key] != value:
                raise ValueError(f"`{key}` is given both directly and in `generate_kwargs` with different values.")
            generation[key] = value
        if generation:
            forward_params["generate_kwargs"] = generation
        return preprocess_params, forward_params, {}

    def preprocess(self, image: Any, timeout: float | None = None,
                   max_image_bytes: int | None = None) -> dict[str, torch.Tensor]:
        if not isinstance(image, (torch.Tensor, np.ndarray)):  # arrays go to the image processor as they are
            image = open_image(image, timeout=timeout, max_bytes=max_image_bytes)
        return {"pixel_values": self.processor(images=image, return_tensors="pt")["pixel_values"]}

    def _forward(self, model_inputs: dict[str, torch.Tensor], generate_kwargs: dict | None = None) -> dict:
        pixel_values = model_inputs["pixel_values"]  # (B, 3, H, W)
        kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}), return_dict_in_generate=False)
        ids = self.model.generate(pixel_values=pixel_values, **kwargs)  # (B * n, T)
        batch = pixel_values.shape[0]
        return {"generated_ids": ids.reshape(batch, ids.shape[0] // batch, -1)}  # (B, n, T)

    def postprocess(self, model_outputs: dict) -> list[dict[str, str]]:
        ids = model_outputs["generated_ids"][0]  # (n, T): one image's returned sequences
        return [{"generated_text": caption} for caption in self.processor.batch_decode(ids)]


def custom_pipelines_entry() -> dict[str, dict[str, Any]]:
    """The config's ``custom_pipelines`` value that makes ``pipeline("image-to-text", model=...,
    trust_remote_code=True)`` load :class:`ClipCapCaptioningPipeline` from this file (what
    `Pipeline.save_pretrained` writes for a registered pipeline)."""
    module = __name__.rsplit(".", 1)[-1]
    return {TASK: {"impl": f"{module}.{ClipCapCaptioningPipeline.__name__}", "pt": ["AutoModel"],
                   "type": "multimodal"}}


def register_clipcap_pipeline() -> None:
    """Register the ``"image-to-text"`` task with `transformers.pipelines.PIPELINE_REGISTRY` (once)."""
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    current = PIPELINE_REGISTRY.supported_tasks.get(TASK)
    if current is None or current.get("impl") is not ClipCapCaptioningPipeline:
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=ClipCapCaptioningPipeline, pt_model=AutoModel,
                                            type="multimodal")


__all__ = ["TASK", "ClipCapCaptioningPipeline", "custom_pipelines_entry", "open_image", "register_clipcap_pipeline"]
