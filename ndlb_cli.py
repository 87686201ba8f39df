"""Console scripts (``pyproject.toml`` ``[project.scripts]``) for the entry scripts whose ``main``
returns the training metrics instead of an exit status: ``ndlb-train-mle`` and ``ndlb-train-sr``
(the other console scripts call the scripts' ``main`` directly)."""

from __future__ import annotations

import sys


def train_mle() -> int:
    """``ndlb-train-mle``: ``train_mle.py`` with the command line's arguments."""
    import train_mle as script

    script.main(sys.argv[1:])
    return 0


def train_sr() -> int:
    """``ndlb-train-sr``: ``train_sr.py`` with the command line's arguments (``accelerate launch
    train_sr.py`` remains the way to train on several processes)."""
    import train_sr as script

    script.main(sys.argv[1:])
    return 0


__all__ = ["train_mle", "train_sr"]
