#!/usr/bin/env bash
# Here, before a session's GPU run: gather what the lent GPU machine lacks into .gpu/ (ignored by git; the device
# tool carries it): the Python packages its image does not hold, as wheels for its Python 3.12, and the reference
# files the GPU tests and benchmarks read (tiny models, their inputs, the SVD-xt configs). About 40 MB.
#
#   benchmarks/gpu_prepare.sh [SHARED_DIR]      (default ../shared)
# then call the device tool: command "bash benchmarks/gpu_session.sh", carry [".gpu"].
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=${1:-$root/../shared}
dest=$root/.gpu
rm -rf "$dest"
mkdir -p "$dest/wheels" "$dest/reference/sonic-tiny"
py=${PYTHON:-python3}
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# what tests/engine/test_gpu.py and bench_stages.py import that the H200 image lacks (its list: device KINDS.md)
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest/wheels" \
  "diffusers==$(version diffusers)" "librosa==$(version librosa)" soundfile soxr audioread pooch decorator platformdirs
cp -r "$shared/reference/svd-xt" "$dest/reference/"
cp -r "$shared/reference/sonic-tiny/models" "$shared/reference/sonic-tiny/inputs" \
  "$shared/reference/sonic-tiny/params.json" "$dest/reference/sonic-tiny/"
du -sh "$dest"
