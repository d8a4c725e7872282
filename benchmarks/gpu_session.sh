#!/usr/bin/env bash
# On a lent GPU machine (device tool; `benchmarks/gpu_prepare.sh` here first, then carry [".gpu"]): the GPU tests,
# the card's matrix-product ceiling, per-call UNet times of the released architectures (random weights) at 512²,
# 768² and 1024², batched vs low-VRAM vs streamed UNet, one end-to-end run. Results: at most 8 files in $OUT
# (or ./gpu-results): session.log, phases.tsv, table.md, gpu.txt, test_gpu.txt, ceiling.json, stages.json,
# e2e.json.
#
#   bash benchmarks/gpu_session.sh                             the GPU session, under 9 minutes (phase budgets)
#   SONIC_GPU_SESSION_DRYRUN=1 bash benchmarks/gpu_session.sh  the same phases on this CPU, tiny models and sizes
#
# Every phase runs under `timeout` with its budget (seconds, × SONIC_GPU_SESSION_TIMEOUT_SCALE); install and
# preflight are fatal (nothing else can work without them); a later phase that fails or times out is recorded and
# the rest still run; the script exits non-zero when any phase failed. SONIC_GPU_SESSION_PHASES=a,b,... runs only
# those phases (the fast test); SONIC_GPU_SESSION_WHEELS=DIR installs the wheels of DIR (default .gpu/wheels; none in
# a dry run).
# shellcheck disable=SC2329  # the phase functions run through `--phase NAME` (under timeout)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
out=${OUT:-$root/gpu-results}
dry=${SONIC_GPU_SESSION_DRYRUN:-0}
scale=${SONIC_GPU_SESSION_TIMEOUT_SCALE:-$([ "$dry" = 1 ] && echo 4 || echo 1)}  # a busy CPU: 4x
only=${SONIC_GPU_SESSION_PHASES:-}
wheels=${SONIC_GPU_SESSION_WHEELS:-$([ "$dry" = 1 ] || echo "$root/.gpu/wheels")}  # dry run: none (they are 3.12's)
mkdir -p "$out"
if [ "${1:-}" = --phase ]; then
  work=$SONIC_GPU_SESSION_WORK  # a phase runs as this script again, under `timeout` (which runs no shell function)
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/sonic-gpu-session.XXXXXX")
  export SONIC_GPU_SESSION_WORK=$work
fi
site=$work/site
export PYTHONPATH=$site:$root${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ -d "$root/.gpu/reference" ]; then
  export SONIC_REFERENCE_DIR=${SONIC_REFERENCE_DIR:-$root/.gpu/reference}
fi
reference=${SONIC_REFERENCE_DIR:-$root/../shared/reference}
# budgets (s): 40 + 40 + 10 + 110 + 25 + 210 + 90 + 10 = 535 s, inside 9 minutes with the device's start aside
declare -A budget=([install]=40 [preflight]=40 [info]=10 [tests]=110 [ceiling]=25 [stages]=210 [e2e]=90 [table]=10)
if [ "$dry" = 1 ]; then
  require_gpu=0 device=cpu dtype=fp32 n=256 sizes=(64) steps=1 seconds=1 decode=1 e2e_steps=1 e2e_seconds=1
  source_args=(--models "$reference/sonic-tiny/models") preflight_args=()
else
  require_gpu=1 device=cuda dtype=fp16 n=8192 sizes=(512 768 1024) steps=2 seconds=4 decode=16 e2e_steps=25
  e2e_seconds=4 source_args=(--random-full --svd-config "$reference/svd-xt") preflight_args=(--gpu)
fi
export SONIC_REQUIRE_GPU=$require_gpu SONIC_REQUIRE_REFERENCE=1
failed=()

phase() {  # phase NAME fatal|continue FUNCTION: FUNCTION under its budget; the outcome goes to phases.tsv
  local name=$1 kind=$2 function=$3 limit start rc=0
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then
    return 0
  fi
  limit=$(awk -v b="${budget[$name]}" -v s="$scale" 'BEGIN { printf "%.1f", b * s }')
  echo "=== $(date -u +%T) phase $name (budget ${limit} s) ==="
  start=$EPOCHREALTIME
  timeout --kill-after=5 "$limit" bash "$root/benchmarks/gpu_session.sh" --phase "$function" || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')" \
    "$limit" >>"$work/phases.tsv"
  if [ "$rc" -ne 0 ]; then
    local why="exit $rc"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then why="timed out after ${limit} s"; fi
    echo "!!! phase $name FAILED ($why)"
    failed+=("$name")
    if [ "$kind" = fatal ]; then
      echo "!!! $name is needed by every later phase: stopping"
      return 1
    fi
  fi
  return 0
}

install_wheels() {
  if [ -n "$wheels" ] && compgen -G "$wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl
    ls "$site"
  elif [ "$dry" = 1 ]; then
    echo "dry run: no wheels installed, using this machine's packages"
  else
    echo "no wheels in $wheels: run benchmarks/gpu_prepare.sh here and carry .gpu" >&2
    return 1
  fi
}

gpu_info() {
  {
    if [ "$dry" = 1 ]; then echo "dry run on the CPU: $(nproc) cores"; else
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    fi
    python3 --version
    uname -srm
  } | tee "$work/gpu.txt"
}

preflight() {
  python3 benchmarks/gpu_bench.py preflight "${preflight_args[@]}"
}

gpu_tests() {  # SONIC_REQUIRE_GPU=1 on the GPU: without CUDA these fail instead of skipping
  python3 -m pytest -q -p no:cacheprovider -o addopts=-ra tests/engine/test_gpu.py 2>&1 | tee "$work/test_gpu.txt"
}

ceiling() {
  python3 benchmarks/gpu_bench.py ceiling --json "$work/ceiling.json" --device "$device" --n "$n"
}

stages() {
  python3 benchmarks/gpu_bench.py stages "${source_args[@]}" --json "$work/stages.json" --device "$device" \
    --dtype "$dtype" --audio "$reference/sonic-tiny/inputs/speech.wav" --sizes "${sizes[@]}" --steps "$steps" \
    --seconds "$seconds" --decode-frames "$decode" --compare-size "${sizes[0]}" --ceiling-json "$work/ceiling.json" \
    --peak-tflops 989
}

e2e() {  # one whole generation through bench_stages.py (no warm-up: the first call's overhead included)
  python3 benchmarks/bench_stages.py "${source_args[@]}" --device "$device" --dtype "$dtype" --min-resolution "${sizes[0]}" \
    --steps "$e2e_steps" --seconds "$e2e_seconds" --audio "$reference/sonic-tiny/inputs/speech.wav" \
    --face-box 180,50,150,180 --no-encode --name "gpu-session-e2e" --peak-tflops 989
  cp benchmarks/results/gpu-session-e2e.json "$work/e2e.json"
}

table() {
  python3 benchmarks/gpu_bench.py table "$work" | tee "$work/table.md"
}

if [ "${1:-}" = --phase ]; then
  "$2"
  exit
fi

main() {
  echo "sonic GPU session $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
    "dry run: $dry, results: $out"
  phase install fatal install_wheels || return 1
  phase preflight fatal preflight || return 1
  phase info continue gpu_info
  phase tests continue gpu_tests
  phase ceiling continue ceiling
  phase stages continue stages
  phase e2e continue e2e
  phase table continue table
  if [ ${#failed[@]} -gt 0 ]; then
    echo "!!! failed phases: ${failed[*]}"
    return 1
  fi
  echo "all phases passed"
}

pack() {  # at most 8 files in $out: the log is there already; the rest are copied from $work
  local f count
  for f in "${results[@]:1}"; do
    if [ -f "$work/$f" ]; then cp "$work/$f" "$out/"; fi
  done
  count=$(find "$out" -type f | wc -l)
  echo "$count files in $out: $(find "$out" -type f -printf '%f ')"
  if [ "$count" -gt 8 ]; then
    echo "!!! more than 8 files in $out (the device tool brings back 8)"
    return 1
  fi
}

results=(session.log phases.tsv table.md gpu.txt test_gpu.txt ceiling.json stages.json e2e.json)
for f in "${results[@]}"; do rm -f "${out:?}/$f"; done
rc=0
main 2>&1 | tee "$out/session.log" || rc=$?
pack >>"$out/session.log" 2>&1 || rc=1
tail -1 "$out/session.log"
rm -rf "$work"
exit "$rc"
