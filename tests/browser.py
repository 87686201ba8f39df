"""A real headless Chromium for the tests of the static HTML pages (review page, demo report)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def chromium_paths() -> tuple[str, str]:
    """(chromium, chromedriver). `make test` installs them (.ci/ensure_browser.sh): a missing
    browser is a broken environment, not a reason to skip."""
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (browser, driver) if not Path(p).exists()]
    assert not missing, (f"{missing} not found: install with `apt-get install chromium chromium-driver` "
                         "(make test does when allowed)")
    return browser, driver


def headless_chrome(profile_dir: Path, prefs: dict[str, Any] | None = None):
    """A selenium Chrome driver (headless, no network chatter, console log captured); the caller
    quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = chromium_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={Path(profile_dir) / 'profile'}"):
        opts.add_argument(arg)
    if prefs:
        opts.add_experimental_option("prefs", prefs)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=opts)
