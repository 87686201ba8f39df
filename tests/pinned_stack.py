"""transformers 4.29.2, the version the authors' release pins (nldb_hf_hosting `requirements.txt`),
beside this environment, for the tests that compare decoding with the release.

`pinned_site()` pip-installs it once per machine (with the tokenizers and huggingface_hub it
needs; torch, numpy, safetensors and the rest come from this environment) into a cache folder
outside the repository: `$NDLB_TEST_CACHE`, else `$XDG_CACHE_HOME/ndlb-tests` or
`~/.cache/ndlb-tests`. `run_pinned` runs `python -m <module>` with that folder first on the path,
so `import transformers` there gives 4.29.2. When pip cannot reach the package index,
`PinnedStackUnavailable` says so (the tests skip with that reason); any other failure is an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINNED = ("transformers==4.29.2", "tokenizers==0.13.3", "huggingface_hub==0.26.5")
# pip's messages when the index cannot be reached (as opposed to a broken install)
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ProxyError",
               "Max retries exceeded", "(from versions: none)")
IMPORT_CHECK = ("import transformers, tokenizers, huggingface_hub, torch; "
                "from transformers import GPT2LMHeadModel, LogitsProcessor; "
                "from huggingface_hub import PyTorchModelHubMixin; "
                "assert transformers.__version__ == '4.29.2', transformers.__version__")


class PinnedStackUnavailable(RuntimeError):
    """pip could not reach the package index to install the pinned stack."""


def cache_root() -> Path:
    if os.environ.get("NDLB_TEST_CACHE"):
        return Path(os.environ["NDLB_TEST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ndlb-tests"


def pinned_env(site: Path) -> dict[str, str]:
    """Environment for a subprocess that imports the pinned stack first (and this repository)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore::UserWarning", OMP_NUM_THREADS="1")
    return env


def pinned_site(timeout: float = 300) -> Path:
    """The folder holding transformers 4.29.2 (installed on first use, then reused)."""
    root = cache_root() / f"transformers-4.29.2-py{sys.version_info.major}{sys.version_info.minor}"
    site = root / "site-packages"
    if (root / "READY").is_file():
        return site
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-input",
                              "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
                              "--target", str(tmp / "site-packages"), *PINNED],
                             capture_output=True, text=True, timeout=timeout)
        if pip.returncode != 0:
            output = (pip.stdout + pip.stderr)[-3000:]
            if any(marker in output for marker in UNREACHABLE):
                raise PinnedStackUnavailable(f"pip could not reach the package index to install {' '.join(PINNED)}:\n"
                                             f"{output}")
            raise RuntimeError(f"pip install {' '.join(PINNED)} failed (exit {pip.returncode}):\n{output}")
        check = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", IMPORT_CHECK],
                               env=pinned_env(tmp / "site-packages"), capture_output=True, text=True, timeout=120)
        if check.returncode != 0:
            raise RuntimeError(f"transformers 4.29.2 installed in {tmp} does not import cleanly with this "
                               f"environment's torch:\n{check.stderr[-3000:]}")
        (tmp / "READY").write_text(" ".join(PINNED) + "\n")
        if root.exists() and not (root / "READY").is_file():  # left by an interrupted older attempt
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            if not (root / "READY").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return site


def run_pinned(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args...` under transformers 4.29.2, from the repository root."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=pinned_env(pinned_site()),
                          capture_output=True, text=True, timeout=timeout)
