#!/bin/sh
# Headless Chromium + chromedriver for the browser tests (review page, demo report), run by
# `make test`. When `chromium` or `chromedriver` is not on PATH, install Debian's `chromium` and
# `chromium-driver` with apt-get, as root or through passwordless sudo; otherwise stop with one
# line that says what to install.
set -eu

have_browser() {
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1
}

have_browser && exit 0

what="the browser tests need chromium and chromedriver on PATH"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: $what; install them (Debian/Ubuntu: apt-get install chromium chromium-driver) and run make test again" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "error: $what; run: sudo apt-get install chromium chromium-driver (then make test again)" >&2
  exit 1
fi

echo "Installing chromium and chromium-driver with apt-get (for the browser tests) ..." >&2
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
if ! have_browser; then
  echo "error: apt-get installed chromium chromium-driver but chromium or chromedriver is still not on PATH" >&2
  exit 1
fi
