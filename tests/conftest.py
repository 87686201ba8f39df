"""Shared test set-up: offline Hub, few threads, session-scoped tiny models.

Fixtures here are cheap to build; helpers that build them live in ``tests/tiny.py``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import tiny  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tokenizer():
    """A GPT-2-style BPE tokenizer trained on tests.tiny.caption_corpus()."""
    return tiny.build_tokenizer()


@pytest.fixture(scope="session")
def tiny_clip_judge_dir(tmp_path_factory, tokenizer):
    """Folder of a tiny random transformers CLIP judge (CLIPModel + tokenizer + image processor)."""
    return tiny.save_tiny_clip_judge(tmp_path_factory.mktemp("clip_judge"), tokenizer)


@pytest.fixture(scope="session")
def tiny_open_clip_model():
    """A tiny random open_clip CLIP model."""
    return tiny.tiny_open_clip()


@pytest.fixture(scope="session")
def tiny_clipcap(tokenizer):
    """(model, processor): a tiny random ClipCap captioner (MLP mapper, 4 prefix tokens), eval mode.
    Session-scoped: do not modify it in place (build your own with tests.tiny.build_tiny_clipcap)."""
    return tiny.build_tiny_clipcap(tokenizer)


@pytest.fixture(scope="session")
def tiny_clipcap_dir(tmp_path_factory, tokenizer):
    """Folder of a saved tiny ClipCap (weights, config with auto_map, code files, processor)."""
    return tiny.save_tiny_clipcap(tmp_path_factory.mktemp("clipcap"), tokenizer)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped (with the reason) on machines without one; "
                                       "benchmarks/gpu_check.sh runs them")
