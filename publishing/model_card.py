"""The model card (README.md) of a published ClipCap captioner (``publishing/templates/model_card.md``).

Metadata (YAML front matter) is built with `huggingface_hub.ModelCardData` / `EvalResult`:
``library_name: transformers``, ``pipeline_tag: image-to-text``, licence, datasets, base models,
tags and a ``model-index`` with the results of ``evaluate_captions.py`` JSON files (TrueMatch R@1
per bag size, paper Sec. 3; RD100 R@1 and ClipScore, CLIP-S, CIDEr-D / BLEU-4, Sec. 4.2;
ImageCoDe, Sec. 5). The body comes from ``templates/model_card.md``: architecture, a usage snippet
that runs as written (AutoModel / AutoProcessor / pipeline with ``trust_remote_code=True``),
evaluation, training settings (from ``trainer_state.json`` and friends, or notes given by the
uploader), limitations (Sec. 4.4-4.5, the CLIP judge, English only), licence and citation.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from .citations import NDLB

TEMPLATE = Path(__file__).with_name("templates") / "model_card.md"
DEFAULT_TAGS = ["image-captioning", "clipcap", "self-retrieval", "fine-grained", "ndlb", "custom_code"]
TASK = "image-to-text"

# Well-known Hub ids of the parts, recognised from their shapes (tiny/unknown shapes: none).
CLIP_IDS = {(768, 12, 32, 224): "openai/clip-vit-base-patch32", (768, 12, 16, 224): "openai/clip-vit-base-patch16",
            (1024, 24, 14, 224): "openai/clip-vit-large-patch14",
            (1024, 24, 14, 336): "openai/clip-vit-large-patch14-336"}
GPT2_IDS = {(768, 12): "gpt2", (1024, 24): "gpt2-medium", (1280, 36): "gpt2-large", (1600, 48): "gpt2-xl"}

MIT_LICENSE_TEXT = """Released under the MIT licence (`license: mit`), the licence of the parts and code it is built
from: CLIP (MIT, OpenAI), GPT-2 (OpenAI's "Modified MIT" licence, an MIT licence with a
notice), ClipCap (MIT) and the EGG / DiscriTune code the paper's training builds on (MIT).
The training captions derive from the COCO annotations (CC BY 4.0, © COCO Consortium; please
attribute them) and, for Visual Caption Boost captions, from LLM/VLM outputs subject to those
models' terms. No image is distributed here; COCO images are Flickr photos under the Flickr terms
of use and their own licences."""

UNKNOWN_LICENSE_TEXT = """To our knowledge the authors' release `{source}` states no licence (its README names none), so
this conversion is marked `license: unknown`: ask the authors (Gaur, Singh S and Tapaswi)
before redistributing or using the weights commercially. The parts it is built from are
permissively licensed: CLIP (MIT), GPT-2 (OpenAI's "Modified MIT" licence) and ClipCap (MIT); the
training captions derive from the COCO annotations (CC BY 4.0) and LLM/VLM outputs; COCO images
(not distributed here) are Flickr photos under the Flickr terms of use."""


# -- helpers --------------------------------------------------------------------------------------


def display_name(value: Any) -> str:
    """A name fit for a public card: local paths become their last component (a card must not
    carry the uploader's machine paths); Hub ids and plain names are kept."""
    text = str(value)
    if os.path.isabs(text) or text.startswith(("./", "../", "~")) or "\\" in text:
        return Path(text.rstrip("/\\")).name or text
    return text


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_eval_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results JSON written by ``evaluate_captions.py --output`` (it must hold a "table"
    object: column name -> value, R@1 and NLG scores in %)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--eval-results {path}: no such file") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--eval-results {path}: not valid JSON ({err})") from err
    if not isinstance(results, dict) or not isinstance(results.get("table"), dict):
        raise ValueError(f"--eval-results {path}: not an evaluate_captions.py results file (no 'table' object); "
                         "write one with `python evaluate_captions.py ... --output results.json`.")
    return results


# -- evaluation -----------------------------------------------------------------------------------


def metric_entries(results: dict[str, Any], dataset_ids: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The model-index entries of one evaluate_captions.py results dict, one per scored column of
    its "table" (vocabulary statistics are not benchmark results and are left out).

    `dataset_ids` maps "truematch", "coco" and "imagecode" to the Hub dataset ids to cite as each
    benchmark's `dataset.type` (defaults: those names)."""
    ids = {"truematch": "truematch", "coco": "coco", "imagecode": "imagecode", **(dataset_ids or {})}
    judge = results.get("judge")
    args = {"judge": display_name(judge)} if judge else None
    coco = dict(dataset_type=ids["coco"], dataset_name="COCO (Karpathy test split)", dataset_split="test")
    out = []
    for key, value in results["table"].items():
        if not _finite(value):
            continue
        entry: dict[str, Any]
        if m := re.fullmatch(r"TM #(\d+)", key):
            size = int(m.group(1))
            entry = dict(dataset_type=ids["truematch"], dataset_name=f"TrueMatch (bags of {size})",
                         dataset_config=f"bags_{size}", dataset_split="test", metric_type="recall",
                         metric_name=f"TrueMatch #{size} R@1", metric_args=args)
        elif m := re.fullmatch(r"RD(\d+)", key):
            entry = dict(**coco, metric_type="recall", metric_name=f"RD{m.group(1)} R@1", metric_args=args)
        elif key == "ClipSc":
            rd = next((k for k in results["table"] if re.fullmatch(r"RD\d+", k)), "RD100")
            entry = dict(**coco, metric_type="clip_score", metric_name=f"ClipScore ({rd})", metric_args=args)
        elif key in ("CLIP-S", "RefCLIP-S"):
            entry = dict(**coco, metric_type=key.lower().replace("-s", "_score").replace("-", "_"),
                         metric_name=key, metric_args=args)
        elif key == "CIDEr":
            entry = dict(**coco, metric_type="cider", metric_name="CIDEr-D")
        elif key == "BLEU-4":
            entry = dict(**coco, metric_type="bleu", metric_name="BLEU-4")
        elif key == "ImageCoDe":
            entry = dict(dataset_type=ids["imagecode"], dataset_name="ImageCoDe", dataset_split="validation",
                         metric_type="recall", metric_name="ImageCoDe R@1", metric_args=args)
        else:  # vocab, words>=5, mean len: descriptive statistics, shown in the card's table only
            continue
        entry["metric_value"] = round(float(value), 2)
        entry["key"] = key
        out.append(entry)
    return out


def eval_results(results_list: list[dict[str, Any]], dataset_ids: dict[str, str] | None = None) -> list[EvalResult]:
    """`EvalResult`s for `ModelCardData(eval_results=...)` from several results files; a metric
    given twice (same dataset, config and name) keeps the last file's value."""
    merged: dict[tuple, dict[str, Any]] = {}
    for results in results_list:
        for entry in metric_entries(results, dataset_ids):
            merged[(entry["dataset_type"], entry.get("dataset_config"), entry["metric_name"])] = entry
    return [EvalResult(task_type=TASK, task_name="Image captioning", verified=False,
                       **{k: v for k, v in e.items() if k != "key" and v is not None})
            for e in merged.values()]


def evaluation_markdown(results_list: list[dict[str, Any]], names: list[str] | None = None) -> str:
    """The card's evaluation section: one table per results file, as evaluate_captions.py prints it."""
    if not results_list:
        return ("Not evaluated yet. Measure it with `python evaluate_captions.py --captions preds.json "
                "--truematch ... --references ... --output results.json` (TrueMatch R@1 per bag size, RD100 R@1, "
                "CLIPScore, CIDEr-D, BLEU-4) and pass the JSON to `upload_model.py --eval-results`.")
    parts = []
    for i, results in enumerate(results_list):
        table = {k: v for k, v in results["table"].items() if v is None or _finite(v)}
        head = "| " + " | ".join(table) + " |"
        rule = "|" + "---|" * len(table)
        cells = []
        for key, value in table.items():
            if value is None:
                cells.append("-")
            elif isinstance(value, int):
                cells.append(str(value))
            else:
                cells.append(f"{value:.2f}" if key == "mean len" else f"{value:.1f}")
        title = f"**{names[i]}**" if names and i < len(names) else f"**Results {i + 1}**"
        judge = results.get("judge")
        notes = [f"CLIP judge `{display_name(judge)}`" if judge else None,
                 f"benchmarks: {', '.join(results['benchmarks'])}" if results.get("benchmarks") else None]
        missing = sum(len(v) for v in (results.get("missing") or {}).values())
        if missing:
            notes.append(f"{missing} needed captions were missing and counted as wrong")
        parts.append("\n".join([f"{title} ({'; '.join(n for n in notes if n)})", "", head, rule,
                                "| " + " | ".join(cells) + " |"]))
    legend = ("TM #s: TrueMatch R@1 (%) on bags of s highly similar COCO images (paper Sec. 3); RDk: R@1 (%) "
              "against k-1 random distractors and ClipSc its mean CLIP score (Sec. 4.2); CLIP-S / RefCLIP-S: "
              "Hessel et al. (2021) x 100; CIDEr: CIDEr-D x 100; BLEU-4 x 100; vocab: distinct words, words>=5: "
              "words used at least 5 times, mean len: words per caption (Table 6). Retrieval numbers depend on "
              "the CLIP judge (see Limitations).")
    return "\n\n".join(parts + [legend])


# -- training -------------------------------------------------------------------------------------


TRAINING_ARG_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "optim",
                     "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                     "seed", "bf16", "fp16", "rewards", "reward_weights", "baseline", "lora_modules", "lora_rank",
                     "lora_alpha", "bag_schedule", "num_generations", "temperature", "max_completion_length")


def read_training_info(folder: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint folder says about its training, from JSON files only:
    ``trainer_state.json`` (steps, epochs, batch size, logged learning rates / losses / rewards),
    SRTrainer's state in it (bag curriculum; ``sr_state.json`` from earlier versions),
    ``adapter_config.json`` (LoRA) and
    ``training_args.json`` when present. ``training_args.bin`` is a pickle and is never loaded
    (it is only noted)."""
    folder = Path(folder)
    info: dict[str, Any] = {}

    def read(name: str) -> dict | None:
        path = folder / name
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    if (state := read("trainer_state.json")) is not None:
        keep = ("global_step", "epoch", "max_steps", "num_train_epochs", "train_batch_size", "logging_steps")
        info["trainer_state"] = {k: state[k] for k in keep if state.get(k) is not None}
        history = [h for h in state.get("log_history") or [] if isinstance(h, dict)]
        rates = [h["learning_rate"] for h in history if _finite(h.get("learning_rate"))]
        if rates:
            info["trainer_state"]["learning_rate_max"] = max(rates)
        train_logs = [h for h in history if not any(k.startswith("eval_") for k in h)]
        if train_logs:
            last = train_logs[-1]
            info["last_log"] = {k: v for k, v in last.items() if _finite(v) and k not in ("step", "epoch")
                                and (k in ("loss", "train_loss", "reward", "reward_std") or k.startswith("rewards/"))}
        evals = [h for h in history if any(k.startswith("eval_") for k in h)]
        if evals:
            info["last_eval"] = {k: v for k, v in evals[-1].items() if k.startswith("eval_") and _finite(v)}
    sr = None
    if state is not None:  # SRTrainer keeps its state in trainer_state.json (stateful_callbacks)
        stored = (state.get("stateful_callbacks") or {}).get("SRStateCallback")
        stored = stored[-1] if isinstance(stored, list) and stored else stored
        sr = ((stored or {}).get("attributes") or {}).get("sr_state") or None
    if sr is None:
        sr = read("sr_state.json")  # written by earlier versions of SRTrainer
    if sr is not None:
        info["sr_state"] = {k: sr[k] for k in ("bag_schedule", "bag_size", "bag_epoch") if sr.get(k) is not None}
    if (adapter := read("adapter_config.json")) is not None:
        targets = adapter.get("target_modules")
        info["lora"] = {"r": adapter.get("r"), "lora_alpha": adapter.get("lora_alpha"),
                        "target_modules": targets if isinstance(targets, str) else sorted(targets or []),
                        "modules_to_save": adapter.get("modules_to_save")}
    if (args := read("training_args.json")) is not None:
        info["training_args"] = {k: args[k] for k in TRAINING_ARG_KEYS if args.get(k) is not None}
    if (folder / "training_args.bin").is_file():
        info["training_args_bin"] = True
    return info


def training_markdown(info: dict[str, Any], notes: str | None = None) -> str:
    """The card's training section from `read_training_info` output and the uploader's notes."""
    lines = []
    if notes:
        lines += [notes.strip(), ""]
    labels = {"trainer_state": "Trainer state (`trainer_state.json`)", "training_args": "Training arguments",
              "sr_state": "Bag curriculum (SRTrainer state)", "lora": "LoRA adapters (merged into these weights)",
              "last_log": "Last logged training values", "last_eval": "Last evaluation during training"}
    for key, label in labels.items():
        if info.get(key):
            values = ", ".join(f"`{k}`: {_fmt(v)}" for k, v in info[key].items())
            lines.append(f"- {label}: {values}")
    if info.get("training_args_bin") and not info.get("training_args"):
        lines.append("- The checkpoint's `training_args.bin` is a pickle and was deliberately not read; see the "
                     "notes above for the full settings.")
    if not lines:
        return ("No training record was found in the checkpoint (no `trainer_state.json`) and no notes were given "
                "(`upload_model.py --training-notes`). For reference, the paper's recipe: MLE pre-training on COCO / "
                "VCB captions (batch 40, lr 2e-5, linear decay, 30k steps, 1k warm-up; CLIP frozen), then REINFORCE "
                "self-retrieval fine-tuning (batch 100, constant lr 9e-8 for SR, 1e-7 for SR + 0.5 CIDEr, 23k steps; "
                "LoRA rank 32 on GPT-2 and/or CLIP, the mapper trained in full) with hard-negative bags and a "
                "bag-size curriculum (paper Sec. 4, App. C.3).")
    return "\n".join(lines).strip()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return f"`{value}`" if isinstance(value, (list, dict)) else str(value)


# -- architecture ---------------------------------------------------------------------------------


def infer_base_models(config) -> list[str]:
    """Hub ids of the CLIP and GPT-2 the model's shapes match (none for unknown shapes)."""
    vision, text = config.vision_config, config.text_config
    clip = CLIP_IDS.get((vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size))
    gpt2 = GPT2_IDS.get((text.n_embd, text.n_layer))
    return [i for i in (clip, gpt2) if i]


def architecture_rows(model) -> str:
    config = model.config
    vision, text = config.vision_config, config.text_config
    if config.mapping_type == "mlp":
        mapper = (f"MLP {config.clip_embed_dim} → {config.mapper_hidden_size} (Tanh) → "
                  f"{config.prefix_length} × {text.n_embd}")
    else:
        mapper = (f"transformer ({config.mapper_num_layers} layers, {config.mapper_num_heads} heads), "
                  f"{config.clip_length} + {config.prefix_length} tokens of width {text.n_embd}")
    n_params = sum(p.numel() for p in model.parameters())
    rows = [
        ("vision encoder", f"CLIP ViT, width {vision.hidden_size}, {vision.num_hidden_layers} layers, patch "
                           f"{vision.patch_size}, {vision.image_size} px, projection to {vision.projection_dim}"),
        ("mapper", mapper + f" ({config.prefix_length} prefix tokens)"),
        ("language model", f"GPT-2, width {text.n_embd}, {text.n_layer} layers, {text.n_head} heads, vocabulary "
                           f"{text.vocab_size}" + (", output bias" if config.lm_head_bias else "")),
        ("parameters", f"{n_params / 1e6:.1f} M" if n_params >= 1e5 else f"{n_params:,}"),
        ("weights", f"safetensors, {next(model.parameters()).dtype}".replace("torch.", "")),
    ]
    return "\n".join(f"| {a} | {b} |" for a, b in rows)


def generation_defaults(model) -> str:
    g = model.generation_config
    parts = [f"`num_beams={g.num_beams}`", f"`max_new_tokens={g.max_new_tokens}`", f"`do_sample={g.do_sample}`"]
    return ", ".join(parts)


# -- the card -------------------------------------------------------------------------------------


def render_model_card(
    model,
    repo_id: str,
    *,
    revision: str | None = None,
    provenance: str = "",
    results_list: list[dict[str, Any]] | None = None,
    results_names: list[str] | None = None,
    training_info: dict[str, Any] | None = None,
    training_notes: str | None = None,
    license: str = "mit",
    license_text: str | None = None,
    datasets: list[str] | None = None,
    base_models: list[str] | None = None,
    tags: list[str] | None = None,
    dataset_ids: dict[str, str] | None = None,
    project_url: str | None = None,
) -> str:
    """README.md for the staged model folder (YAML metadata + body)."""
    results_list = results_list or []
    name = repo_id.split("/")[-1]
    base_models = infer_base_models(model.config) if base_models is None else base_models
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag=TASK, license=license, language=["en"],
        datasets=list(datasets) if datasets else None, base_model=list(base_models) or None,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *(tags or [])])), model_name=name,
        eval_results=eval_results(results_list, dataset_ids) or None,
        metrics=sorted({e["metric_type"] for r in results_list for e in metric_entries(r, dataset_ids)}) or None,
    )
    if license_text is None:
        license_text = MIT_LICENSE_TEXT if license == "mit" else f"`license: {license}`."
    fields = dict(
        metadata=card_data.to_yaml(), title=name, provenance=provenance.strip(),
        architecture_rows=architecture_rows(model), generation_defaults=generation_defaults(model),
        repo_id=repo_id, revision_arg=f' revision="{revision}",' if revision and revision != "main" else "",
        project_ref=f"the [project repository]({project_url})" if project_url else "the project repository",
        evaluation=evaluation_markdown(results_list, results_names),
        training=training_markdown(training_info or {}, training_notes), license_text=license_text.strip(),
        citation=NDLB,
    )
    return string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(fields)


__all__ = [
    "architecture_rows",
    "display_name",
    "eval_results",
    "evaluation_markdown",
    "infer_base_models",
    "load_eval_results",
    "metric_entries",
    "read_training_info",
    "render_model_card",
    "training_markdown",
]
