#!/usr/bin/env bash
# Here (no GPU needed), before a session's GPU run: gather into .gpu/ (ignored by git; the device tool carries it)
# what the lent machine's image lacks: the Python packages as wheels for its CPython 3.12 on x86-64 Linux
# (benchmarks/gpu_image_packages.txt lists what the image holds), and the reference files the GPU tests and
# benchmarks read (tiny models, their inputs, the SVD-xt configs). About 40 MB; the whole call must stay under 64 MiB.
#
#   benchmarks/gpu_prepare.sh [SHARED_DIR]            (default ../shared)
#   benchmarks/gpu_prepare.sh --verify [SHARED_DIR]   also install the wheels into a Python 3.12 venv here (pyenv)
#                                                     beside the image's own packages and read + resample speech
#
# Fails (non-zero) when a wheel is missing for 3.12, a requirement is neither carried nor on the image
# (`gpu_bench.py check-wheels`), or the call would exceed 64 MiB. Prints the device tool's run arguments.
set -euo pipefail
verify=0
if [ "${1:-}" = --verify ]; then
  verify=1
  shift
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=${1:-$root/../shared}
dest=$root/.gpu
py=${PYTHON:-python3}
rm -rf "$dest"
mkdir -p "$dest/wheels" "$dest/reference/sonic-tiny"

# what the session imports that the image lacks, with everything those need that the image lacks too, at the
# versions this checkout's tests run with here: soundfile needs cffi (and cffi pycparser) or it does not import
wheels=(
  diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
  librosa==0.11.0 soundfile==0.14.0 cffi==2.0.0 pycparser==3.0 soxr==1.1.0 audioread==3.1.0 pooch==1.9.0
  decorator==5.2.1 platformdirs==4.14.9
)
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest/wheels" "${wheels[@]}" 2> >(grep -v \
  "is neither a file nor a directory" >&2)
"$py" "$root/benchmarks/gpu_bench.py" check-wheels "$dest/wheels" \
  --need torch transformers diffusers librosa soundfile safetensors scikit-image pytest numpy pillow

cp -r "$shared/reference/svd-xt" "$dest/reference/"
cp -r "$shared/reference/sonic-tiny/models" "$shared/reference/sonic-tiny/inputs" \
  "$shared/reference/sonic-tiny/params.json" "$dest/reference/sonic-tiny/"

# the call's size: tracked files + untracked files git does not ignore + .gpu
tree=$(cd "$root" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
  | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
carry=$(du -sb "$dest" | cut -f1)
total=$((tree + carry))
awk -v t="$tree" -v c="$carry" 'BEGIN { m = 1048576; printf "working tree %.1f MiB + .gpu %.1f MiB = %.1f MiB of 64 MiB\n",
  t / m, c / m, (t + c) / m }'
if [ "$total" -ge $((64 * 1048576)) ]; then
  echo "too big for the device tool (64 MiB a call)" >&2
  exit 1
fi

if [ "$verify" = 1 ]; then
  # the image's Python packages that the carried ones import (torch aside), from the registry, into a 3.12 venv;
  # then the carried wheels exactly as gpu_session.sh installs them there (no index, no dependencies)
  py312=""
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$HOME"/.local/share/uv/python/*3.12*/bin/python3.12; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
      py312=$candidate
      break
    fi
  done
  if [ -z "$py312" ]; then
    echo "--verify: no Python 3.12 here (pyenv install 3.12 or uv python install 3.12)" >&2
    exit 1
  fi
  venv=${TMPDIR:-/tmp}/sonic-gpu-verify-312
  rm -rf "$venv"
  "$py312" -m venv "$venv"
  "$venv/bin/python" -m pip install -q numpy scipy numba scikit-learn joblib msgpack lazy_loader typing_extensions \
    packaging requests filelock regex pillow "safetensors==0.8.0" "huggingface_hub==1.33.0" zipp \
    2> >(grep -v "is neither a file nor a directory" >&2)
  "$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --target "$venv/carried" "$dest"/wheels/*.whl
  PYTHONPATH=$venv/carried "$venv/bin/python" - "$dest/reference/sonic-tiny/inputs/speech.wav" <<'EOF'
import sys

import cffi
import diffusers
import librosa
import soundfile

data, rate = soundfile.read(sys.argv[1], dtype="float32", always_2d=True)
mono = librosa.resample(data.mean(axis=1), orig_sr=rate, target_sr=16000, res_type="soxr_hq")
trimmed, _ = librosa.effects.trim(mono, top_db=40.0)
print(f"verify ok: Python {sys.version.split()[0]}, cffi {cffi.__version__}, soundfile {soundfile.__version__}, "
      f"librosa {librosa.__version__}, diffusers {diffusers.__version__}; speech {len(data) / rate:.2f} s at {rate} Hz "
      f"-> {len(mono)} samples at 16 kHz, {len(trimmed)} after trimming")
EOF
fi

cat <<EOF
ready. Device tool call (one call, about 9 minutes of device time; the machine's start comes on top):
  run  command: bash benchmarks/gpu_session.sh
       carry:   [".gpu"]
       timeout_s: 600
Results come back in files_at: session.log, phases.tsv, table.md, gpu.txt, test_gpu.txt, ceiling.json,
stages.json, e2e.json; copy table.md into benchmarks/README.md (GPU section).
EOF
