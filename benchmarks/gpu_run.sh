#!/usr/bin/env bash
# One-call GPU run: build, check, GPU tests, benchmark -- all logs and results under one folder.
#
#   benchmarks/gpu_run.sh [OUT_DIR]        (default: $OUT, else ./gpu_run_out)
#
# Steps and their time boxes (the whole must fit a 10-minute command on an H100; each step is
# cut by `timeout` so a slow one cannot starve the ones after it, and a cut is logged):
#   1. build      pip install --no-build-isolation --no-deps .  (sm_90 only unless
#                 FUSED_RESNET_CUDA_ARCHS is set; MAX_JOBS = cores)              <= 300 s
#   2. info/check fused-resnet info; fused-resnet check                         <=  60 s
#   3. tests      pytest tests/gpu, stops after TESTS_MAXFAIL (25) failures   <= TESTS_TIMEOUT (90) s
#   3b. igemm     the opt-in CUDA implicit-GEMM conv, still unvalidated, in its own step so a
#                 failure there cannot use up the other GPU tests' --maxfail: pytest
#                 tests/gpu/test_cuda_igemm.py (<= 75 s), then benchmarks/igemm_layers.py
#                 (igemm vs cuDNN per ResNet-50 layer, bf16, batch 256; <= 80 s); both
#                 appended to tests.log (table + one IGEMM_JSON line: the file count stays 8)
#   4. bench      a) fused-resnet bench (resnet50, bf16, batch 64; every level and mode;
#                    torch.compile at model level only; --time-budget)            rest - 180 s
#                 b) max-autotune + freezing, model inference, own process        rest - 20 s
#                 c) per layer (only when BENCH_STEPS names "layers"; default BENCH_STEPS=main,max):
#                    every distinct ResNet-50 conv, inference, bf16 channels_last, at each batch of
#                    LAYER_BATCHES (default "32 256"), one process and one results/layers_b<B>.json
#                    each: fused cuda + triton vs conv_only (cuDNN conv alone: the %conv column),
#                    eager_cl (cuDNN conv + separate eager BN/add/ReLU: the "vs cl" column) and
#                    cudnn_fused; the time left is shared between the batches. Run it as a second
#                    call on the warm machine: SKIP_BUILD=1 SKIP_TESTS=1 BENCH_STEPS=layers benchmarks/gpu_run.sh
#                    (6 files then; with main and max too it would be 10, over the limit of 8)
#                 d) batch-1 latency (only when BENCH_STEPS names "b1"): whole-model inference at
#                    batch 1 (CUDA graphs), fused cuda + triton vs eager; results/model_b1.json. With
#                    the layers step: SKIP_BUILD=1 SKIP_TESTS=1 BENCH_STEPS=layers,b1 (7 files)
#   5. summary    the short table, printed last
#
# Device time: a session now gets 15 minutes of it in all (start, idle and every call included):
# one full call (GPU_RUN_BUDGET_S, default 570 s) plus a short second call on the warm machine,
# e.g. GPU_RUN_BUDGET_S=200 SKIP_BUILD=1 SKIP_TESTS=1 BENCH_STEPS=layers,b1 LAYER_BATCHES=256.
#
# Writes (8 files, the device tool's limit): build.log, check.log, tests.log, bench.log,
# results/<time>_<gpu>_resnet50_bfloat16.{json,md,png} (JSON + markdown + plot with GPU name,
# driver, versions, command and time) and results/compile_max.json. Copy results/ into
# benchmarks/results/ to commit them. BENCH_ARGS adds options to both bench runs.
#
# SKIP_BUILD=1 reuses an installed build (a second call on a warm machine); SKIP_TESTS=1 skips
# steps 3 and 3b (e.g. SKIP_BUILD=1 SKIP_TESTS=1 BENCH_STEPS=layers for the per-layer call).
# Runs from outside the source tree after the install, so `import fused_resnet` is the built one.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$(mkdir -p "${1:-${OUT:-./gpu_run_out}}" && cd "${1:-${OUT:-./gpu_run_out}}" && pwd)"
PY="${PYTHON:-python}"
TOTAL="${GPU_RUN_BUDGET_S:-570}"   # seconds for the whole script
T0=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
step() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$OUT_DIR/results"

step "build (log: build.log)"
if [ -n "${SKIP_BUILD:-}" ]; then
  echo "SKIP_BUILD set: using the installed fused_resnet" > "$OUT_DIR/build.log"; BUILD_RC=0
else
(
  cd "$REPO" && export FUSED_RESNET_CUDA_ARCHS="${FUSED_RESNET_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    FUSED_RESNET_FORCE_CUDA_BUILD=1 && timeout 300 "$PY" -m pip install --no-build-isolation --no-deps . 
) > "$OUT_DIR/build.log" 2>&1
BUILD_RC=$?
fi
tail -3 "$OUT_DIR/build.log"
[ $BUILD_RC -eq 0 ] || echo "build FAILED (rc $BUILD_RC; 124 = timed out) -- see build.log"

cd "$OUT_DIR" || exit 1
step "info + check (log: check.log)"
{ timeout 30 "$PY" -m fused_resnet.cli info; timeout 60 "$PY" -m fused_resnet.cli check; } > check.log 2>&1
CHECK_RC=$?
tail -4 check.log

if [ -n "${SKIP_TESTS:-}" ]; then
  echo "SKIP_TESTS set: tests/gpu and the igemm step skipped" | tee tests.log
  TESTS_RC=skipped; IGEMM_TESTS_RC=skipped; IGEMM_RC=skipped
else
step "tests/gpu (log: tests.log)"
timeout "${TESTS_TIMEOUT:-90}" "$PY" -m pytest "$REPO/tests/gpu" -q --maxfail="${TESTS_MAXFAIL:-25}" -p no:cacheprovider --rootdir "$REPO" \
  --ignore "$REPO/tests/gpu/test_cuda_igemm.py" > tests.log 2>&1
TESTS_RC=$?
tail -3 tests.log

step "igemm: tests/gpu/test_cuda_igemm.py, then per-layer timings (appended to tests.log)"
timeout 75 "$PY" -m pytest "$REPO/tests/gpu/test_cuda_igemm.py" -q -p no:cacheprovider --rootdir "$REPO" \
  > igemm.tmp 2>&1
IGEMM_TESTS_RC=$?
tail -3 igemm.tmp
{ echo "== tests/gpu/test_cuda_igemm.py (rc $IGEMM_TESTS_RC)"; cat igemm.tmp; } >> tests.log
timeout 80 "$PY" "$REPO/benchmarks/igemm_layers.py" --batch 256 --dtype bfloat16 --budget 45 > igemm.tmp 2>&1
IGEMM_RC=$?
grep -v '^IGEMM_JSON' igemm.tmp
{ echo "== benchmarks/igemm_layers.py (rc $IGEMM_RC)"; cat igemm.tmp; } >> tests.log
rm -f igemm.tmp
fi

# 4a. everything but max-autotune, leaving ~150 s for 4b; --time-budget stops new measurements
#     in time, and the outer timeout only guards against one measurement running away
BENCH_STEPS=",${BENCH_STEPS:-main,max},"
BUDGET=$(( $(left) - 180 ))
step "bench, budget ${BUDGET}s (log: bench.log)"
: > bench.log
if [ "${BENCH_STEPS#*,main,}" = "$BENCH_STEPS" ]; then
  echo "BENCH_STEPS has no 'main': skipped" | tee -a bench.log; BENCH_RC=skipped
elif [ "$BUDGET" -gt 60 ]; then
  timeout $(( BUDGET + 60 )) "$PY" -m fused_resnet.cli bench --no-progress --compile-levels model --time-budget "$BUDGET" \
    --baselines eager,eager_cl,cudnn_fused,conv_only,compile --results results ${BENCH_ARGS:-} > bench.log 2>&1
  BENCH_RC=$?
else
  echo "no time left for the benchmark" | tee bench.log
  BENCH_RC=1
fi
# 4c. per layer at LAYER_BATCHES (see the header), before 4b so max-autotune cannot starve it
LAYERS_RC=skipped
if [ "${BENCH_STEPS#*,layers,}" != "$BENCH_STEPS" ]; then
  set -- ${LAYER_BATCHES:-32 256}
  LAYERS_RC=
  while [ $# -gt 0 ]; do
    RESERVE=0; [ "${BENCH_STEPS#*,max,}" != "$BENCH_STEPS" ] && RESERVE=160
    LB=$(( ($(left) - 20 - RESERVE) / $# - 30 ))
    step "bench per layer, batch $1, budget ${LB}s (log: bench.log, results/layers_b$1.json)"
    if [ "$LB" -gt 30 ]; then
      timeout $(( LB + 30 )) "$PY" -m fused_resnet.cli bench --no-progress --levels layer --mode inference \
        --batch "$1" --layer-batch "$1" --dtype bfloat16 --backends cuda,triton \
        --baselines conv_only,eager_cl,cudnn_fused --time-budget "$LB" --json "results/layers_b$1.json" \
        ${BENCH_ARGS:-} >> bench.log 2>&1
      LAYERS_RC="$LAYERS_RC$?,"
    else
      echo "no time left for the per-layer run at batch $1" | tee -a bench.log; LAYERS_RC="${LAYERS_RC}none,"
    fi
    shift
  done
fi
# 4d. batch-1 latency (only when BENCH_STEPS names "b1"): whole-model inference at batch 1, CUDA
#     graphs on both sides (issue #7's latency target), fused cuda + triton (the latter exercises
#     Triton's split-K, which only small M triggers) vs eager NCHW / channels_last
B1_RC=skipped
if [ "${BENCH_STEPS#*,b1,}" != "$BENCH_STEPS" ]; then
  RESERVE=0; [ "${BENCH_STEPS#*,max,}" != "$BENCH_STEPS" ] && RESERVE=160
  B1=$(( $(left) - 20 - RESERVE ))
  step "bench batch-1 latency, budget ${B1}s (log: bench.log, results/model_b1.json)"
  if [ "$B1" -gt 40 ]; then
    timeout $(( B1 + 20 )) "$PY" -m fused_resnet.cli bench --no-progress --levels model --mode inference \
      --batch 1 --backends cuda,triton --baselines eager,eager_cl --time-budget "$B1" \
      --json results/model_b1.json ${BENCH_ARGS:-} >> bench.log 2>&1
    B1_RC=$?
  else
    echo "no time left for the batch-1 run" | tee -a bench.log; B1_RC=none
  fi
fi
# 4b. torch.compile(mode="max-autotune") + freezing, whole-model inference only, in its own process
#     so that a tuning run cut by the timeout loses only this row
MAXT=$(( $(left) - 20 ))
step "bench max-autotune, ${MAXT}s (log: bench.log, results/compile_max.json)"
if [ "${BENCH_STEPS#*,max,}" = "$BENCH_STEPS" ]; then
  echo "BENCH_STEPS has no 'max': skipped" >> bench.log; MAX_RC=skipped
elif [ "$MAXT" -gt 60 ]; then
  timeout "$MAXT" "$PY" -m fused_resnet.cli bench --no-progress --levels model --mode inference --backends cuda \
    --baselines eager_cl,compile_max --json results/compile_max.json ${BENCH_ARGS:-} >> bench.log 2>&1
  MAX_RC=$?
else
  echo "no time left for max-autotune" >> bench.log
  MAX_RC=1
fi

step "summary"
echo "build rc=$BUILD_RC  check rc=$CHECK_RC  tests rc=$TESTS_RC  igemm tests rc=$IGEMM_TESTS_RC  igemm bench rc=$IGEMM_RC  bench rc=$BENCH_RC  per-layer rc=$LAYERS_RC  batch-1 rc=$B1_RC  max-autotune rc=$MAX_RC (124 = timed out)"
"$PY" - <<'PYEOF'
import glob, json
from fused_resnet.bench import report
files = sorted(glob.glob("results/*.json"))
if not files:
    print("no benchmark result written (see bench.log)")
for f in files:
    r = json.load(open(f))
    g = r["env"].get("gpu") or {}
    print(f"{f}: {g.get('name', 'CPU')} driver {g.get('driver')} torch {r['env']['versions']['torch']}")
    print(report.format_summary(r))
PYEOF
