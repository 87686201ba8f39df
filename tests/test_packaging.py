"""Installable package (issue 16.7): ``pip install .`` into a fresh virtual environment, then the
console scripts work from another folder, the modules come from the environment (not from this
checkout), and the files read at run time (templates, prompts, the evaluate modules' folders with
their symlinked files as real files) ship.

A real fresh venv would download torch & co (~6 GB); instead the new venv gets a ``.pth`` line
that makes the already-installed pinned dependencies of this interpreter visible, and the
package is installed with ``--no-deps --no-build-isolation --no-index`` (offline, setuptools from
the ``test`` extra). Everything happens under ``tmp_path``: the source tree is copied there first,
because building writes ``build/`` and ``*.egg-info`` next to the sources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SCRIPTS = PYPROJECT["project"]["scripts"]
PACKAGE_DIRS = ("modeling_clipcap", "trainers", "metrics", "datasets_scripts", "evaluation", "publishing")


def source_files() -> list[str]:
    """Files of the checkout (tracked and untracked, without what .gitignore ignores)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        return [f for f in listed.stdout.splitlines()
                if f.split("/")[0] not in (".venv", ".git") and ((ROOT / f).is_file() or (ROOT / f).is_symlink())]
    skip = {".git", ".venv", "__pycache__", "demo_out", "build", ".pytest_cache"}
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)]


def copy_sources(dest: Path) -> None:
    for name in source_files():
        src, out = ROOT / name, dest / name
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), out)
        else:
            shutil.copy2(src, out)


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def test_pip_install_then_console_scripts_from_another_folder(tmp_path):
    src, env_dir, elsewhere = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
    before = build_outputs()
    copy_sources(src)
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "ndlb-test-dependencies.pth").write_text("\n".join(deps) + "\n")
    env = clean_env(tmp_path)
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--no-cache-dir", "--quiet", str(src)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]

    # every console script answers --help from a folder that is not the checkout
    elsewhere.mkdir()
    runs = {name: subprocess.Popen([env_dir / "bin" / name, "--help"], cwd=elsewhere, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in SCRIPTS}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} --help: {err[-3000:]}"
        assert out.startswith("usage:"), f"{name} --help printed {out[:200]!r}"
    assert {"ndlb-caption", "ndlb-train-sr", "ndlb-train-mle", "ndlb-evaluate", "ndlb-upload"} <= set(SCRIPTS)

    # the modules come from the new environment, and what they read at run time is there
    check = f"""
import importlib.util, json
import datasets_scripts.review_bags, datasets_scripts.truematch, datasets_scripts.vcb.prompts as prompts
import evaluate_captions, evaluation
from publishing import model_card
files = [model_card.TEMPLATE, datasets_scripts.review_bags.TEMPLATE, datasets_scripts.truematch.CARD_TEMPLATE,
         *[prompts.DEFAULT_PROMPTS_DIR / f"{{n}}.yaml" for n in ("blendcap", "visualcap", "holisticcap")]]
cider = evaluation.load_metric("cider_d").compute(predictions=["a dog runs.", None],
                                                  references=[["a dog runs."], ["a cat."]])
names = ("evaluate_captions", "evaluation", "inference", "metrics", "modeling_clipcap", "ndlb_cli", "publishing",
         "trainers", "train_sr", "train_mle", "upload_model", "datasets_scripts")
print(json.dumps({{"modules": [importlib.util.find_spec(n).origin for n in names],
                   "missing_files": [str(f) for f in files if not f.is_file()], "cider_missing": cider["missing"]}}))
"""
    run = subprocess.run([python, "-c", check], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(Path(f).is_relative_to(site) for f in out["modules"]), out["modules"]
    assert out["missing_files"] == [] and out["cider_missing"] == [1]

    # every file of the packages' folders ships, symbolic links as the files they point to
    shipped = [f for f in source_files() if f.split("/")[0] in PACKAGE_DIRS and "__pycache__" not in f]
    assert any(f.startswith("metrics/cider_d/") and (ROOT / f).is_symlink() for f in shipped)
    for name in shipped:
        installed = site / name
        assert installed.is_file() and not installed.is_symlink(), f"{name} was not installed"
        assert installed.read_bytes() == (ROOT / name).read_bytes(), name
    for module in PYPROJECT["tool"]["setuptools"]["py-modules"]:
        assert (site / f"{module}.py").read_bytes() == (ROOT / f"{module}.py").read_bytes()
    assert build_outputs() == before, "building wrote into the checkout"


def build_outputs() -> set[str]:
    return {p.name for p in (ROOT / "build", *ROOT.glob("*.egg-info")) if p.exists()}


def test_requirements_are_the_pinned_runtime_set_and_tests_an_extra():
    """requirements.txt: the pinned run-time set the Makefile installs (and the package's
    dependencies); pytest and selenium only in the `test` extra, pinned too."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    pins = [line for line in lines if line]
    assert all("==" in line for line in pins), pins
    names = {line.split("==")[0].lower() for line in pins}
    assert {"torch", "transformers", "evaluate", "datasets"} <= names and not names & {"pytest", "selenium"}
    assert PYPROJECT["project"]["dynamic"] == ["dependencies"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    test_extra = PYPROJECT["project"]["optional-dependencies"]["test"]
    assert all("==" in req for req in test_extra)
    assert {req.split("==")[0] for req in test_extra} >= {"pytest", "selenium"}
