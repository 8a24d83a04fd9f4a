#!/usr/bin/env bash
# The whole GPU check of nbformer, as one script for one call of the device tool (see README.md here):
#
#   versions -> CUDA tests on the real GPU -> compute-sanitizer racecheck + memcheck on small
#   attention / linear launches -> kernel benchmarks (bench_attention.py, bench_linear.py,
#   bench_attention_backward.py, when they exist) -> `nbformer tune --device cuda` on the linear and
#   attention spaces -> whole-model benchmarks (bench_models.py) ->
#   training benchmarks (bench_train.py)
#
# Every step runs under its own `timeout` and within an overall budget (CHECK_BUDGET_S, default
# 480 s = 8 minutes), so one hang cannot eat the rest; a step that fails does not stop the others.
# Output goes to "$OUT" (default /tmp/nbformer-gpu), at most 8 files (the device tool's limit):
#   check.log         versions, the tests, every step's output and the summary
#   sanitize.log      racecheck and memcheck output, with their summaries
#   gpu_results.md    the benchmark tables (markdown), versions first, the step summary last
#   gpu_results.json  bench_models.py's results
#   bench_attention.json, bench_linear.json, bench_attention_backward.json, bench_train.json
#                     the other benchmarks' results (the kernel ones when they take --json)
#
#   OUT=/tmp/out bash benchmarks/gpu/check.sh
# Caps per step (seconds) may be overridden: CAP_TESTS CAP_RACECHECK CAP_MEMCHECK CAP_BENCH_ATTENTION
# CAP_BENCH_LINEAR CAP_BENCH_ATTENTION_BACKWARD CAP_TUNE CAP_BENCH_TRAIN; MODELS_EXTRA (more bench_models.py options,
# e.g. "--only decode,prefill"); TRAIN_EXTRA (more bench_train.py options, e.g. "--only gpt2,small");
# PYTHON (default python3); NUMBA_CACHE_DIR (default a dir under /tmp shared by
# every step, so kernels compiled by the tests are reused by the later steps).
set -u -o pipefail

cd "$(dirname "$0")/../.." || exit 2
ROOT=$PWD
OUT="${OUT:-/tmp/nbformer-gpu}"
mkdir -p "$OUT"
LOG="$OUT/check.log"
SAN="$OUT/sanitize.log"
MD="$OUT/gpu_results.md"
JSON="$OUT/gpu_results.json"
: > "$LOG"; : > "$SAN"; : > "$MD"

PY="${PYTHON:-python3}"
BUDGET="${CHECK_BUDGET_S:-480}"
START=$SECONDS
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# pytest (and anything else missing from the device image) can travel in benchmarks/gpu/.vendor
# (pip install --target benchmarks/gpu/.vendor pytest, then carry it): used only when present
[ -d "$ROOT/benchmarks/gpu/.vendor" ] && export PYTHONPATH="$PYTHONPATH:$ROOT/benchmarks/gpu/.vendor"
[ "${CHECK_SMOKE:-0}" = 1 ] || export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/nbformer-gpu-numba-cache}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
# CHECK_SMOKE=1 tries this script's logic on a machine without a GPU: Numba's CUDA simulator
# for tests and sanitizer (no compute-sanitizer: skipped), bench_models.py --smoke --device cpu.
# Otherwise: the real GPU, everywhere.
if [ "${CHECK_SMOKE:-0}" = 1 ]; then
    export NUMBA_ENABLE_CUDASIM=1; TEST_GPU=0; MODELS_ARGS=(--smoke --device cpu)  # the simulator is too slow for models
else
    unset NUMBA_ENABLE_CUDASIM; TEST_GPU=1; MODELS_ARGS=()
fi

TMPD=$(mktemp -d /tmp/nbformer-gpu-check.XXXXXX)
trap 'rm -rf "$TMPD"' EXIT
SUMMARY=()
log() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - (SECONDS - START) )); }

# run_step NAME CAP LOGFILE CMD...: the command under timeout min(CAP, what is left - 5 s), its
# output tee'd into LOGFILE (and check.log); records "NAME: rc, seconds" for the summary.
run_step() {
    local name=$1 cap=$2 file=$3; shift 3
    local t=$(( $(left) - 5 )); (( cap < t )) && t=$cap
    if (( t < 10 )); then
        log "=== $name: SKIPPED (only $(left) s of the ${BUDGET} s budget left)"
        SUMMARY+=("$name: skipped (budget)"); return 0
    fi
    log ""; log "=== $name (timeout ${t} s, $(( SECONDS - START )) s into the check) ==="
    [ "$file" != "$LOG" ] && echo "=== $name (timeout ${t} s) ===" >> "$file"
    local s=$SECONDS rc
    if [ "$file" = "$LOG" ]; then
        timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"; rc=${PIPESTATUS[0]}
    else
        timeout -k 10 "$t" "$@" 2>&1 | tee -a "$file" "$LOG"; rc=${PIPESTATUS[0]}
    fi
    local what="rc=$rc"
    (( rc == 124 || rc == 137 )) && what="TIMED OUT after ${t} s (rc=$rc)"
    log "=== $name: $what, $(( SECONDS - s )) s"
    SUMMARY+=("$name: $what, $(( SECONDS - s )) s")
    return 0
}

# ------------------------------------------------------------------ 0. versions
{
    echo "=== versions ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
    echo "python: $($PY --version 2>&1) ($(command -v "$PY"))"
    timeout 60 "$PY" - <<'EOF' 2>&1
from importlib import metadata
for p in ("numpy", "numba", "numba-cuda", "llvmlite", "torch", "transformers", "sentence-transformers",
          "tokenizers", "safetensors", "click", "pytest"):
    try:
        print(f"{p}: {metadata.version(p)}")
    except metadata.PackageNotFoundError:
        print(f"{p}: NOT INSTALLED")
try:
    import torch
    print(f"torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"available {torch.cuda.is_available()}")
except Exception as e:
    print(f"torch: {type(e).__name__}: {e}")
try:
    from numba import cuda
    d = cuda.get_current_device()
    name = d.name.decode() if isinstance(d.name, bytes) else d.name
    print(f"numba.cuda: {name}, compute capability {d.compute_capability}")
    print(f"numba.cuda: driver API {cuda.cudadrv.driver.driver.get_version()}, "
          f"runtime {cuda.runtime.get_version()}")
except Exception as e:
    print(f"numba.cuda: {type(e).__name__}: {e}")
EOF
    echo "nvidia-smi:"
    timeout 30 nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv 2>&1 || echo "nvidia-smi failed"
    echo "compute-sanitizer: $(timeout 30 compute-sanitizer --version 2>&1 | tail -n 1)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
    echo "cores: $(nproc), NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-unset}, budget ${BUDGET} s"
} 2>&1 | tee -a "$LOG"
{ echo "# nbformer GPU check"; echo; echo '```'; sed -n '2,$p' "$LOG"; echo '```'; echo; } >> "$MD"

# ------------------------------------------------------------------ a. CUDA tests on the GPU
if "$PY" -c "import pytest" 2>/dev/null; then
    run_step "tests (CUDA, $([ "$TEST_GPU" = 1 ] && echo on the GPU || echo SIMULATED))" "${CAP_TESTS:-150}" "$LOG" \
        env NBFORMER_TEST_GPU=$TEST_GPU "$PY" -m pytest -q --maxfail=10 tests/test_cuda_*.py tests/test_devices.py \
        tests/test_tuning_cuda.py $("$PY" -c "import gguf" 2>/dev/null && echo tests/test_quant.py) \
        -p no:cacheprovider --durations=10
else
    log "=== tests: SKIPPED, pytest is not installed (see benchmarks/gpu/README.md: .vendor)"
    SUMMARY+=("tests: skipped (no pytest)")
fi

# ------------------------------------------------------------------ b. compute-sanitizer
sanitize() {  # sanitize TOOL CAP
    local tool=$1 cap=$2
    if ! command -v compute-sanitizer >/dev/null; then
        log "=== $tool: SKIPPED, compute-sanitizer is not on the PATH"; SUMMARY+=("$tool: skipped (no compute-sanitizer)")
        return
    fi
    run_step "compute-sanitizer $tool" "$cap" "$SAN" \
        compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 50 \
        "$PY" benchmarks/gpu/sanitize_attention.py
    # the verdict from this run's part of the log: the summaries, and whether every launch ran
    local part verdict
    part=$(awk -v h="=== compute-sanitizer $tool (" 'index($0, h) == 1 {p = ""} {p = p $0 "\n"} END {printf "%s", p}' "$SAN")
    {
        echo "--- $tool summary:"
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY|SANITIZE (OK|FAILED)" <<<"$part" || echo "(no summary line)"
    } | tee -a "$SAN" "$LOG"
    if grep -q "ERROR SUMMARY: 0 errors" <<<"$part" && grep -q "SANITIZE OK" <<<"$part"; then
        verdict="PASS (0 errors, every launch ran and matched)"
    else
        verdict="FAIL or incomplete (see sanitize.log)"
    fi
    SUMMARY+=("  $tool verdict: $verdict")
    log "--- $tool: $verdict"
}
sanitize racecheck "${CAP_RACECHECK:-45}"
sanitize memcheck "${CAP_MEMCHECK:-30}"

# ------------------------------------------------------------------ c. benchmarks
kernel_bench() {  # kernel_bench NAME CAP: benchmarks/gpu/NAME.py with the options it takes
    local name=$1 cap=$2 f="benchmarks/gpu/$1.py"
    if [ ! -f "$f" ]; then
        log "=== $name: not there yet ($f)"; SUMMARY+=("$name: absent"); return
    fi
    local t=$(( $(left) - 5 )); (( cap < t )) && t=$cap
    local md="$TMPD/$name.md" args=()
    # its markdown goes to a file of its own (a script may open --md with "w"), appended below
    grep -q -- '"--md"' "$f" && args+=(--md "$md")
    grep -q -- '"--json"' "$f" && args+=(--json "$OUT/$name.json")
    grep -q -- '"--budget"' "$f" && (( t > 20 )) && args+=(--budget "$(( t - 8 ))")
    [ "${CHECK_SMOKE:-0}" = 1 ] && grep -q -- '"--smoke"' "$f" && args+=(--smoke)
    if grep -q -- '"--md"' "$f"; then
        run_step "$name" "$t" "$LOG" "$PY" "$f" ${args[@]+"${args[@]}"}
        [ -s "$md" ] && { cat "$md"; echo; } >> "$MD"
    else  # no --md: its stdout goes into the markdown as it is
        echo "## $name" >> "$MD"
        run_step "$name" "$t" "$MD" "$PY" "$f" ${args[@]+"${args[@]}"}
        sed -i -e '/^=== '"$name"' (timeout/d' "$MD"
    fi
}
kernel_bench bench_attention "${CAP_BENCH_ATTENTION:-60}"
kernel_bench bench_linear "${CAP_BENCH_LINEAR:-75}"
kernel_bench bench_attention_backward "${CAP_BENCH_ATTENTION_BACKWARD:-45}"

# tuning on the GPU (where block sizes pay most): the CUDA linear and attention spaces at GPT-2
# shapes, every candidate validated against the float64 reference first; the table lands in the log
T_TUNE="${CAP_TUNE:-50}"
run_step "tune (CUDA linear + attention)" "$T_TUNE" "$LOG" \
    env NBFORMER_CACHE_DIR="$TMPD/nbcache" "$PY" -m cli.main tune --device cuda --kernels linear \
    --shape N=1024,K=768,M=3072,act=gelu_tanh --shape N=8,K=768,M=2304,act=none --budget "$(( T_TUNE / 3 ))"
run_step "tune (CUDA attention)" "$T_TUNE" "$LOG" \
    env NBFORMER_CACHE_DIR="$TMPD/nbcache" "$PY" -m cli.main tune --device cuda --kernels attention \
    --shape B=1,NH=12,HS=64,Tq=1024,causal=true --budget "$(( T_TUNE / 3 ))"

# bench_models gets what is left less bench_train's cap (or half of what is left, when that is less)
CAP_TRAIN="${CAP_BENCH_TRAIN:-100}"
L_MODELS=$(( $(left) - 15 )); R_TRAIN=$CAP_TRAIN; (( R_TRAIN > L_MODELS / 2 )) && (( L_MODELS - R_TRAIN < 90 )) && R_TRAIN=$(( L_MODELS / 2 ))
T_MODELS=$(( L_MODELS - R_TRAIN ))
run_step "bench_models" "$T_MODELS" "$LOG" \
    "$PY" benchmarks/gpu/bench_models.py --json "$JSON" --md "$MD" --budget "$(( T_MODELS - 10 ))" \
    ${MODELS_ARGS[@]+"${MODELS_ARGS[@]}"} ${MODELS_EXTRA:-}

# training: GPT-2 124M and bench_train.py's small step vs torch, train --device cuda vs cpu
T_TRAIN=$(( $(left) - 10 )); (( CAP_TRAIN < T_TRAIN )) && T_TRAIN=$CAP_TRAIN
run_step "bench_train" "$T_TRAIN" "$LOG" \
    "$PY" benchmarks/gpu/bench_train.py --json "$OUT/bench_train.json" --md "$MD" --budget "$(( T_TRAIN - 8 ))" \
    ${MODELS_ARGS[@]+"${MODELS_ARGS[@]}"} ${TRAIN_EXTRA:-}

# ------------------------------------------------------------------ summary
{
    echo ""; echo "=== summary ($(( SECONDS - START )) s of ${BUDGET} s)"
    for s in "${SUMMARY[@]}"; do echo "$s"; done
} | tee -a "$LOG"
{ echo; echo "## Check summary"; echo; echo '```'; for s in "${SUMMARY[@]}"; do echo "$s"; done
  echo "total $(( SECONDS - START )) s"; echo '```'; } >> "$MD"
exit 0
