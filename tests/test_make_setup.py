"""`make test` sets itself up (issue 16.1): its recipe installs the pinned test packages and runs
the browser step before pytest; `.ci/run` is exactly the README's test command; the browser step
(`make browser`, .ci/ensure_browser.sh) reaches apt-get when chromium is missing and allowed (root or
passwordless sudo) and otherwise stops with one line that says what to install.

The browser step runs for real through `make`, with a PATH that holds only a few tools and a fake
apt-get (and fake id / sudo) that records its calls; nothing is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
README_TEST_COMMAND = "make test"

FAKE_APT = """#!/bin/sh
echo "apt-get $* DEBIAN_FRONTEND=${DEBIAN_FRONTEND:-}" >> "$CALLS"
if [ "$1" = install ]; then  # "installs" the browser where PATH finds it
  for tool in chromium chromedriver; do
    printf '#!/bin/sh\\nexit 0\\n' > "$FAKEBIN/$tool"; /bin/chmod +x "$FAKEBIN/$tool"
  done
fi
"""
FAKE_SUDO = """#!/bin/sh
[ "$1" = -n ] && shift
[ "$1" = true ] && exit 0
echo "sudo $1" >> "$CALLS"
exec "$@"
"""


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def run_browser_step(tmp_path: Path, *, apt: bool = True, uid: int = 0, sudo: bool = False,
                     browser: bool = False) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`make -s browser` with PATH = a folder of chosen tools; returns (result, recorded calls)."""
    fakebin, calls = tmp_path / "bin", tmp_path / "calls.log"
    fakebin.mkdir()
    for tool in ("sh", "env"):
        os.symlink(shutil.which(tool), fakebin / tool)
    executable(fakebin / "id", f"#!/bin/sh\necho {uid}\n")
    if apt:
        executable(fakebin / "apt-get", FAKE_APT)
    if sudo:
        executable(fakebin / "sudo", FAKE_SUDO)
    if browser:
        for tool in ("chromium", "chromedriver"):
            executable(fakebin / tool, "#!/bin/sh\nexit 0\n")
    env = {"PATH": str(fakebin), "CALLS": str(calls), "FAKEBIN": str(fakebin), "HOME": str(tmp_path)}
    result = subprocess.run([MAKE, "-s", "browser"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_make_test_installs_test_packages_and_browser_before_pytest():
    # under `make test` itself this is a sub-make: without MAKELEVEL/MAKEFLAGS it prints no
    # "Entering directory" lines around the recipe
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run([MAKE, "--no-print-directory", "-n", "test"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=env)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    browser = lines.index("sh .ci/ensure_browser.sh")
    pytest_line = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert browser < pytest_line == len(lines) - 1
    # the test extra's pins are installed (when their stamp is out of date) from pyproject.toml
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: \$\(TEST_STAMP\) browser$", makefile, flags=re.M)
    assert '["optional-dependencies"]["test"]' in makefile


def test_ci_run_is_exactly_the_readme_test_command():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', README_TEST_COMMAND]
    assert f"\n{README_TEST_COMMAND}" in (ROOT / "README.md").read_text()


def test_missing_browser_as_root_is_installed_with_apt_get(tmp_path):
    result, calls = run_browser_step(tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls == ["apt-get update -qq DEBIAN_FRONTEND=",
                     "apt-get install -y -qq chromium chromium-driver DEBIAN_FRONTEND=noninteractive"]


def test_missing_browser_with_passwordless_sudo_is_installed_through_sudo(tmp_path):
    result, calls = run_browser_step(tmp_path, uid=1000, sudo=True)
    assert result.returncode == 0, result.stderr
    assert calls == ["sudo apt-get", "apt-get update -qq DEBIAN_FRONTEND=", "sudo env",
                     "apt-get install -y -qq chromium chromium-driver DEBIAN_FRONTEND=noninteractive"]


def test_present_browser_installs_nothing(tmp_path):
    result, calls = run_browser_step(tmp_path, browser=True)
    assert result.returncode == 0 and calls == [] and result.stderr == ""


@pytest.mark.parametrize("case", [dict(uid=1000), dict(apt=False)], ids=["not-root-no-sudo", "no-apt-get"])
def test_missing_browser_not_installable_says_what_to_install(tmp_path, case):
    result, calls = run_browser_step(tmp_path, **case)
    assert result.returncode != 0 and calls == []
    message = [line for line in result.stderr.splitlines() if not line.startswith("make:")]
    assert len(message) == 1, result.stderr
    assert message[0].startswith("error: ") and "apt-get install chromium chromium-driver" in message[0]
