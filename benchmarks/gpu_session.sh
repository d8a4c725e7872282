#!/usr/bin/env bash
# On a lent GPU machine (device tool; `benchmarks/gpu_prepare.sh` first, then carry [".gpu"]): the GPU tests, then
# the full-size benchmarks with random weights, in one go. Results land in $OUT (or ./gpu-results).
#
#   bash benchmarks/gpu_session.sh            about 8 minutes on an H200
#   bash benchmarks/gpu_session.sh --smoke    the same commands on the CPU at toy sizes (checks the script)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
if ! python3 -c "import diffusers, librosa" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sonic-site \
    .gpu/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/sonic-site:$PWD PYTHONUNBUFFERED=1 SONIC_REFERENCE_DIR=$PWD/.gpu/reference
face=180,50,150,180  # the astronaut's face (no dlib there)
seconds=10
if [ "${1:-}" = "--smoke" ]; then
  device=(--device cpu) big=(--min-resolution 64) small=(--min-resolution 64) steps=1 few=1 fp16=fp32 bf16=fp32
  seconds=1
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py 2>&1 | tee "$out/test_gpu.txt"
  device=(--device cuda --peak-tflops 989) big=(--min-resolution 768 1024) small=(--min-resolution 512) steps=25 few=5
  fp16=fp16 bf16=bf16
fi
common=(--random-full --svd-config .gpu/reference/svd-xt --audio .gpu/reference/sonic-tiny/inputs/speech.wav
        --face-box $face --no-encode --seconds $seconds)
bench() { python3 benchmarks/bench_stages.py "${common[@]}" "${device[@]}" "$@" 2>&1 | tail -40; }
# fp16 (the GPU default) at 512² for 25 steps, batched and low-VRAM; 768² and 1024² per call with fewer steps
bench "${small[@]}" --steps $steps --dtype $fp16 --low-vram both --name gpu-fp16-512 | tee "$out/bench_fp16_512.txt"
bench "${big[@]}" --steps $few --dtype $fp16 --name gpu-fp16-768-1024 | tee "$out/bench_fp16_big.txt"
bench "${small[@]}" --steps $few --dtype $bf16 --name gpu-bf16-512 | tee "$out/bench_bf16_512.txt"
bench "${small[@]}" --steps $few --dtype $fp16 --channels-last --name gpu-fp16-512-cl | tee "$out/bench_cl_512.txt"
cp benchmarks/results/gpu-*.json "$out/" 2>/dev/null
ls "$out"
