"""Publishing on the Hugging Face Hub: everything that turns this project's outputs into Hub
repositories, in one package.

- :mod:`publishing.model_staging`: resolve a ClipCap checkpoint (a ``save_pretrained`` folder, a
  Trainer ``checkpoint-N``, a LoRA adapter checkpoint merged into its base, or the authors' NDLB
  release converted with ``modeling_clipcap.convert_ndlb``), load it, and stage the folder to push
  (weights, config with ``modeling_clipcap.AUTO_MAP``, remote code, processor, model card);
- :mod:`publishing.model_card`: the model card (``templates/model_card.md``, Hub metadata and a
  ``model-index`` from ``evaluate_captions.py`` results);
- :mod:`publishing.dataset_staging`: validate, complete (card, ``dataset_info``) and stage the
  TrueMatch and HolisticCap dataset folders;
- :mod:`publishing.hub`: the Hub-push options every publishing CLI shares (:class:`PushOptions`),
  the one-commit push and the CLI flow (check, stage into ``--dry-run OUT`` or a temporary folder,
  push);
- :mod:`publishing.citations`: the BibTeX entries the project cites, defined once (the metric
  modules carry vendored copies that a test keeps equal).

The command lines are thin faces over it: ``upload_model.py`` (models) and
``python -m datasets_scripts.publish`` (datasets). This package may import ``common``,
``metrics``, ``modeling_clipcap`` and ``evaluation``; never ``trainers``, ``datasets_scripts``, a
top-level script or ``demo/`` (tests/test_layout.py).
"""
