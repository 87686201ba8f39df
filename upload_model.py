"""Publish a ClipCap captioner on the Hugging Face Hub with a real model card.

    python upload_model.py --checkpoint sr-lv-bagcurri --repo-id USER/clipcap-ndlb \\
        --eval-results results_truematch.json results_coco.json [--private] [--revision BRANCH]
    python upload_model.py --from-ndlb manu-gaur/NDLB --repo-id USER/NDLB-transformers
    python upload_model.py --checkpoint DIR --repo-id USER/NAME --dry-run staged/   # stage only

The staged folder (what gets pushed) holds:

- ``model.safetensors``, ``config.json`` (with ``auto_map``, the same as any ``save_pretrained``
  writes: ``modeling_clipcap.AUTO_MAP``, and ``custom_pipelines`` for the "image-to-text"
  pipeline), ``generation_config.json``;
- the remote code: ``configuration_clipcap.py``, ``modeling_clipcap.py``,
  ``processing_clipcap.py``, ``pipeline_clipcap.py``, ``image_loading.py``;
- the processor files (``processor_config.json``, tokenizer files);
- ``README.md``: the model card (``publishing/model_card.py``).

Checkpoints accepted by ``--checkpoint``: a folder saved by ``save_pretrained`` (train_mle.py,
train_sr.py, the converters), a Trainer checkpoint ``checkpoint-N`` with full weights (only the
model and processor are published, never optimizer state), or a LoRA / peft adapter checkpoint
(``adapter_config.json``; e.g. SRTrainer's ``checkpoint-N`` with SR-L/V/LV adapters), which is
merged into its base model (``--lora-base`` or the adapter's ``base_model_name_or_path``).
``--from-ndlb`` converts the authors' release (a Hub id or a local folder in its layout) with
``modeling_clipcap.convert_ndlb`` first.

The push is one commit (``HfApi.upload_folder``) after ``create_repo(exist_ok=True)`` and, with
``--revision``, ``create_branch``. Log in first (``hf auth login``) or set ``HF_TOKEN``.

This is the command line only: checkpoint resolution and staging are ``publishing.model_staging``,
the card ``publishing.model_card``, the push options and the push ``publishing.hub`` (shared with
``python -m datasets_scripts.publish``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from publishing.hub import PushOptions, publish_folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="upload_model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="ClipCap folder, Trainer checkpoint-N or LoRA adapter folder")
    src.add_argument("--from-ndlb", metavar="SRC", help="the authors' release: Hub id (manu-gaur/NDLB) or local folder "
                     "in its layout (model.safetensors + config.json); converted first")
    PushOptions.add_arguments(p, repo_help="Hub model repository to create / update",
                              dry_run_help="only stage the folder into OUT; push nothing",
                              commit_default="says what was published")
    g = p.add_argument_group("model card")
    g.add_argument("--eval-results", nargs="+", metavar="JSON", help="evaluate_captions.py --output files; their "
                   "scores go into the card and its model-index")
    g.add_argument("--training-notes", metavar="TEXT_OR_FILE", help="training settings for the card (markdown text "
                   "or a .md/.txt file); the checkpoint's trainer_state.json / sr_state.json are read as well")
    g.add_argument("--license", help="licence id for the card (default: mit; unknown for --from-ndlb, whose "
                   "release states none)")
    g.add_argument("--dataset-id", action="append", metavar="ID", help="Hub dataset id used for training or "
                   "evaluation (repeatable), listed in the card's `datasets`")
    g.add_argument("--truematch-id", metavar="ID", help="Hub id of the TrueMatch dataset the TM results refer to")
    g.add_argument("--coco-id", metavar="ID", help="Hub id of the COCO (Karpathy) dataset of RD100 / NLG results")
    g.add_argument("--base-model-id", action="append", metavar="ID", help="base model ids for the card (default: "
                   "inferred from the shapes, e.g. openai/clip-vit-base-patch32 and gpt2)")
    g.add_argument("--tag", action="append", metavar="TAG", help="extra tag (repeatable)")
    g.add_argument("--project-url", metavar="URL", help="link to the code repository in the card")
    g = p.add_argument_group("checkpoint loading")
    g.add_argument("--processor", metavar="DIR_OR_ID", help="processor to publish when the checkpoint has none")
    g.add_argument("--lora-base", metavar="DIR_OR_ID", help="base model of a LoRA adapter checkpoint (default: the "
                   "adapter's base_model_name_or_path)")
    g = p.add_argument_group("--from-ndlb conversion (see python -m modeling_clipcap.convert_ndlb --help)")
    g.add_argument("--tokenizer", help="GPT-2 tokenizer id or folder (default: the one in a local release folder, "
                   "else gpt2)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the converted weights (default: float32)")
    g.add_argument("--vision-heads", type=int, help="CLIP vision attention heads (default: width / 64)")
    g.add_argument("--text-heads", type=int, help="GPT-2 attention heads (default: width / 64)")
    g.add_argument("--mapper-heads", type=int, help="transformer mapper heads (default: 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from publishing.model_staging import default_commit_message, stage

    def stage_model(out: Path, workdir: Path) -> str:
        stage(args, out, workdir)
        return default_commit_message(args)

    return publish_folder(PushOptions.from_args(args), repo_type="model", stage=stage_model, check_dry_run=True,
                          dry_run_note=" Push with the same command without --dry-run.")


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
