# One-command entry points. Each sets up what it needs: the virtual environment with the pinned
# requirements when it is missing or older than requirements.txt, and for the tests the pinned
# `test` extra of pyproject.toml and a headless Chromium (.ci/ensure_browser.sh).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test venv browser clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# The test-only packages: the pins of pyproject.toml's `test` extra (without installing the project).
$(TEST_STAMP): $(STAMP) pyproject.toml
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]))' > $(VENV)/requirements-test.txt
	$(PY) -m pip install --quiet -r $(VENV)/requirements-test.txt
	touch $(TEST_STAMP)

# Headless Chromium + chromedriver for the browser tests: apt-get when missing and allowed, else
# a one-line error that says what to install.
browser:
	@sh .ci/ensure_browser.sh

# Main job: the whole method end to end on the offline synthetic world.
demo: $(STAMP)
	$(PY) -m demo.run --out demo_out

test: $(TEST_STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean:
	rm -rf demo_out .pytest_cache
