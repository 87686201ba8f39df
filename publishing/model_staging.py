"""Model publishing: resolve a ClipCap checkpoint, load it, write the folder to push with its card.

``stage(args, out, workdir)`` is what ``upload_model.py`` runs (``args`` are its parsed options).
The staged folder holds:

- ``model.safetensors``, ``config.json`` (with ``auto_map`` and ``custom_pipelines``, exactly as
  any ``save_pretrained`` of the model writes them: ``modeling_clipcap.AUTO_MAP``),
  ``generation_config.json``;
- the remote code: ``configuration_clipcap.py``, ``modeling_clipcap.py``,
  ``processing_clipcap.py``, ``pipeline_clipcap.py``, ``image_loading.py``;
- the processor files (``processor_config.json``, tokenizer files);
- ``README.md``: the model card (:mod:`publishing.model_card`).

Checkpoints: a folder saved by ``save_pretrained``, a Trainer ``checkpoint-N`` with full weights
(model and processor only, never optimizer state), or a LoRA / peft adapter checkpoint merged into
its base model; ``--from-ndlb`` converts the authors' release with ``modeling_clipcap.convert_ndlb``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from common import staged_dir

from .hub import PublishError

logger = logging.getLogger(__name__)

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


@dataclass
class Source:
    """The checkpoint to publish, once resolved to a transformers ClipCap folder."""

    folder: Path  # holds config.json + weights (ours)
    kind: str  # "model" | "trainer-checkpoint" | "lora" | "ndlb"
    name: str  # public name of the source (no machine path)
    processor_folder: Path | None = None
    training_folder: Path | None = None  # where trainer_state.json etc. are
    notes: list[str] = field(default_factory=list)


# -- resolving the checkpoint -----------------------------------------------------------------------


def _public_name(src: str | os.PathLike) -> str:
    from .model_card import display_name

    return display_name(str(src))


def _has_processor(folder: Path) -> bool:
    return any((folder / name).is_file() for name in PROCESSOR_FILES)


def convert_release(src: str, workdir: Path, args: argparse.Namespace) -> Source:
    """`--from-ndlb`: convert the authors' release (Hub id or local folder) into `workdir`."""
    from modeling_clipcap.conversion_utils import ConversionError
    from modeling_clipcap.convert_ndlb import convert_ndlb

    tokenizer = args.tokenizer
    if tokenizer is None:  # a tokenizer saved inside a local release folder wins over the default gpt2
        tokenizer = src if (Path(src) / "tokenizer_config.json").is_file() else "gpt2"
    try:
        out = convert_ndlb(src, workdir / "converted", tokenizer=tokenizer, dtype=args.dtype,
                           vision_heads=args.vision_heads, text_heads=args.text_heads,
                           mapper_heads=args.mapper_heads, overwrite=True)
    except ConversionError as err:
        raise PublishError(f"--from-ndlb {src}: {err}") from err
    name = _public_name(src)
    return Source(out, "ndlb", name, processor_folder=out, notes=[
        f"Converted from the authors' release `{name}` with `modeling_clipcap.convert_ndlb` (OpenAI-layout CLIP "
        "vision tower, GPT-2 without the extra prefix rows of the release's decoding trick, the -inf-tailed "
        "lm_head bias kept as an output bias on the real vocabulary); the project's tests check that converted "
        "models reproduce the release layout's logits."])


def merge_lora(folder: Path, workdir: Path, base: str | None) -> Source:
    """A peft/LoRA adapter checkpoint merged into its base model (saved under `workdir`)."""
    from peft import PeftModel

    from modeling_clipcap import ClipCapForCaptioning

    adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    base = base or adapter.get("base_model_name_or_path")
    if not base:
        raise PublishError(f"{folder} is a LoRA adapter checkpoint whose adapter_config.json names no base model; "
                          "pass --lora-base with the ClipCap folder or Hub id the adapters were trained on.")
    try:
        model = ClipCapForCaptioning.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise PublishError(f"cannot load the LoRA base model {base!r} of {folder} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); pass --lora-base DIR_OR_ID.") from err
    try:
        merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise PublishError(f"cannot apply the adapters in {folder} to {base!r} ({type(err).__name__}: {err}); is "
                          "--lora-base the model they were trained on?") from err
    out = workdir / "merged"
    merged.save_pretrained(out)
    processor_folder = folder if _has_processor(folder) else (Path(base) if Path(base).is_dir() else None)
    base_name = _public_name(base)
    targets = adapter.get("target_modules")
    return Source(out, "lora", _public_name(folder), processor_folder=processor_folder, training_folder=folder,
                  notes=[f"LoRA adapters (rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, targets "
                         f"`{targets}`) from `{_public_name(folder)}` merged into `{base_name}` with peft's "
                         "`merge_and_unload` (the published weights need no peft)."])


def resolve_checkpoint(args: argparse.Namespace, workdir: Path) -> Source:
    """Turn --checkpoint / --from-ndlb into a transformers ClipCap folder."""
    if args.from_ndlb:
        return convert_release(args.from_ndlb, workdir, args)
    folder = Path(args.checkpoint)
    if not folder.is_dir():
        raise PublishError(f"--checkpoint {folder}: no such folder.")
    from modeling_clipcap.convert_ndlb import is_release_folder

    if (folder / "adapter_config.json").is_file():
        return merge_lora(folder, workdir, args.lora_base)
    if is_release_folder(folder):
        raise PublishError(f"--checkpoint {folder} is in the authors' NDLB release layout; use --from-ndlb {folder} "
                          "(it converts the release first).")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PublishError(f"--checkpoint {folder} has no config.json: expected a folder saved with save_pretrained, a "
                          "Trainer checkpoint-N folder or a LoRA adapter checkpoint (adapter_config.json).")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise PublishError(f"{config_path} is not a valid JSON config ({err}).") from err
    if model_type != "clipcap":
        raise PublishError(f"{config_path} has model_type {model_type!r}; this script publishes ClipCap models "
                          "(model_type 'clipcap').")
    kind = "trainer-checkpoint" if (folder / "trainer_state.json").is_file() else "model"
    training = folder if kind == "trainer-checkpoint" else (
        folder if any((folder / n).is_file() for n in ("trainer_state.json", "sr_state.json", "training_args.json")) else None)
    return Source(folder, kind, _public_name(folder), processor_folder=folder, training_folder=training)


def load_source(source: Source, processor: str | None):
    """(model, processor) of a resolved source, in eval mode, with a clear error when the
    processor files are missing."""
    from transformers import AutoProcessor

    from modeling_clipcap import ClipCapForCaptioning

    try:
        model = ClipCapForCaptioning.from_pretrained(source.folder).eval()
    except (OSError, ValueError) as err:
        raise PublishError(f"cannot load the model in {source.folder} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}).") from err
    where = processor or source.processor_folder
    if where is None or (Path(str(where)).is_dir() and not _has_processor(Path(str(where)))):
        raise PublishError(f"{source.name} has no processor files ({', '.join(PROCESSOR_FILES[:2])}, tokenizer); pass "
                          "--processor with the folder or Hub id of the ClipCap processor it was trained with.")
    try:
        proc = AutoProcessor.from_pretrained(str(where))
    except (OSError, ValueError) as err:
        raise PublishError(f"cannot load the processor from {where} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); pass --processor.") from err
    return model, proc


# -- staging ----------------------------------------------------------------------------------------


def save_model_folder(model, processor, folder: Path) -> None:
    """Weights (safetensors), config with auto_map + custom_pipelines, remote code (configuration,
    modeling, processing, pipeline) and processor files: a plain ``save_pretrained`` of each (the
    save hook of ``modeling_clipcap`` writes the remote-code entries), checked."""
    from modeling_clipcap import AUTO_MAP

    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    expected = {"configuration_clipcap.py", "modeling_clipcap.py", "processing_clipcap.py", "pipeline_clipcap.py",
                "image_loading.py", "model.safetensors", "config.json", "generation_config.json"}
    missing = sorted(n for n in expected if not (folder / n).is_file())
    if missing or config.get("auto_map") != AUTO_MAP or "custom_pipelines" not in config:
        raise PublishError(f"the staged folder is incomplete (missing {missing or 'auto_map/custom_pipelines'}); "
                          "this is a bug in publishing/model_staging.py.")


def check_weights(model, folder: Path) -> None:
    """The staged safetensors hold exactly the model's tensors."""
    import torch
    from safetensors.torch import load_file

    staged = {}
    for path in sorted(folder.glob("*.safetensors")):
        staged.update(load_file(str(path)))
    state = model.state_dict()
    absent = [k for k in state if k not in staged and not (k == "language_model.lm_head.weight"
                                                            and "language_model.transformer.wte.weight" in staged)]
    different = [k for k in state if k in staged and not torch.equal(state[k].cpu(), staged[k])]
    if absent or different:
        raise PublishError(f"the staged weights differ from the checkpoint (absent: {absent[:5]}, different: "
                          f"{different[:5]}); nothing was pushed.")


def _read_notes(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    try:
        is_file = "\n" not in value and path.is_file()
    except OSError:  # long text is not a file name
        is_file = False
    if is_file:
        return path.read_text(encoding="utf-8")
    if "\n" not in value and path.suffix.lower() in (".md", ".txt"):
        raise PublishError(f"--training-notes {path}: no such file.")
    return value


def build_card(model, source: Source, args: argparse.Namespace) -> str:
    from .model_card import UNKNOWN_LICENSE_TEXT, load_eval_results, read_training_info, render_model_card

    try:
        results = [load_eval_results(p) for p in args.eval_results or []]
    except (FileNotFoundError, ValueError) as err:
        raise PublishError(str(err)) from err
    names = [Path(p).stem for p in args.eval_results or []]
    training = read_training_info(source.training_folder) if source.training_folder else {}
    notes = _read_notes(args.training_notes)
    license_name = args.license or ("unknown" if source.kind == "ndlb" else "mit")
    license_text = UNKNOWN_LICENSE_TEXT.format(source=source.name) if license_name == "unknown" else None
    kinds = {"model": f"Published from the checkpoint `{source.name}`.",
             "trainer-checkpoint": f"Published from the Trainer checkpoint `{source.name}` (model weights and "
                                   "processor only; optimizer and scheduler states are not included).",
             "lora": "", "ndlb": ""}
    provenance = " ".join([kinds[source.kind], *source.notes]).strip()
    if source.kind == "ndlb" and not notes:
        notes = ("The weights are the authors' (see the paper, Sec. 4 and App. C.3, for their training: MLE "
                 "pre-training on COCO / Visual Caption Boost captions, then self-retrieval fine-tuning with "
                 "REINFORCE, LoRA on CLIP and GPT-2, hard-negative bags and a bag-size curriculum, optionally "
                 "with a CIDEr reward); they were not retrained here.")
    dataset_ids = {k: v for k, v in (("truematch", args.truematch_id), ("coco", args.coco_id)) if v}
    datasets = list(dict.fromkeys([*(args.dataset_id or []), *[v for v in dataset_ids.values() if "/" in v]]))
    return render_model_card(
        model, args.repo_id, revision=args.revision, provenance=provenance, results_list=results,
        results_names=names, training_info=training, training_notes=notes, license=license_name,
        license_text=license_text, datasets=datasets, base_models=args.base_model_id, tags=args.tag,
        dataset_ids=dataset_ids, project_url=args.project_url,
    )


def stage(args: argparse.Namespace, out: Path, workdir: Path) -> Path:
    """Resolve, load, save and describe the model into `out` (written atomically)."""
    source = resolve_checkpoint(args, workdir)
    model, processor = load_source(source, args.processor)
    card = build_card(model, source, args)
    with staged_dir(out) as tmp:
        save_model_folder(model, processor, tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        check_weights(model, tmp)
    logger.info("Staged %s (%s) in %s: %s", source.name, source.kind, out, ", ".join(sorted(os.listdir(out))))
    return out


def default_commit_message(args: argparse.Namespace) -> str:
    what = f"the authors' release {args.from_ndlb} (converted)" if args.from_ndlb else \
        f"checkpoint {_public_name(args.checkpoint)}"
    return f"Upload ClipCap captioner from {what} with remote code, image-to-text pipeline and model card"


__all__ = ["Source", "build_card", "check_weights", "default_commit_message", "load_source",
           "merge_lora", "resolve_checkpoint", "save_model_folder", "stage"]
