#!/usr/bin/env bash
# The GPU check: the one script run on the GPU machine, from the repository root:
#
#     bash bench/gpu_check.sh
#
# 1. installs the carried wheels (.whl/*.whl: torchattacks, pure Python) into /tmp/site;
# 2. prints the versions (nvidia-smi, python, cupy, numba, numba-cuda, torch) and
#    advkern.kernels.available();
# 3. runs the GPU tests (tests/test_backends.py tests/test_engine.py) under `timeout`;
# 4. runs `python3 -m bench --gpu` under `timeout` (the bench has its own deadline, --total,
#    20 s inside it, and rewrites its report after every item);
# 5. copies the logs and the bench's results into $OUT (at most 8 files come back) and prints
#    one summary block (test counts, backend validation, every row's key ratios).
#
# Environment: OUT (default /tmp/gpu-check-out), TESTS_TIMEOUT (120), BENCH_TIMEOUT (150),
# BENCH_TOTAL (BENCH_TIMEOUT - 20), BENCH_ARGS (extra bench flags, e.g. "--quick" for a smoke
# run), SKIP_TESTS=1 (bench only). The bundled models' weights are taken from
# .whl/advkern-cache when it is there (trained on first use otherwise: ~20 s more).
# advkern itself is used from the checkout (PYTHONPATH), never pip-installed.

set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset CUPY_TF32 NUMBA_ENABLE_CUDASIM ADVKERN_CUPY_EMULATOR ADVKERN_BACKEND
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
TESTS_TIMEOUT=${TESTS_TIMEOUT:-120}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
BENCH_TOTAL=${BENCH_TOTAL:-$((BENCH_TIMEOUT - 20))}
BENCH_ARGS=${BENCH_ARGS:-}
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

stamp "installing the carried wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "wheel install FAILED"
else
    echo "no wheels in .whl/: the torchattacks rows will be skipped"
fi
export PYTHONPATH=/tmp/site:$PWD
if [ -d .whl/advkern-cache ]; then
    export ADVKERN_CACHE=$PWD/.whl/advkern-cache
fi

stamp "versions"
{
    nvidia-smi -L || echo "nvidia-smi FAILED"
    python3 --version
    python3 - <<'EOF'
import importlib, importlib.metadata
for mod, dist in (("numpy", "numpy"), ("cupy", None), ("numba", "numba"),
                  ("numba_cuda", "numba-cuda"), ("torch", "torch"), ("scipy", "scipy"),
                  ("torchattacks", "torchattacks")):
    try:
        m = importlib.import_module(mod)
        v = getattr(m, "__version__", None)
        if v is None and dist:
            v = importlib.metadata.version(dist)
        print(f"{mod} {v} ({getattr(m, '__file__', '?')})")
    except Exception as e:
        print(f"{mod}: NOT importable: {type(e).__name__}: {e}")
try:
    import torch
    print(f"torch CUDA {torch.version.cuda}, available {torch.cuda.is_available()}, "
          f"cuDNN {torch.backends.cudnn.version()}")
except Exception as e:
    print(f"torch CUDA: {e}")
try:
    import cupy
    rt = cupy.cuda.runtime
    print(f"cupy: device {rt.getDeviceProperties(0)['name']}, driver {rt.driverGetVersion()}, "
          f"runtime {rt.runtimeGetVersion()}")
except Exception as e:
    print(f"cupy device: {e}")
EOF
    echo "ADVKERN_CACHE=${ADVKERN_CACHE:-unset (the bundled models will be trained)}"
    python3 -c "from advkern import kernels; print('kernels.available():', kernels.available())"
} 2>&1 | tee "$OUT/versions.log"

tests_rc=skipped
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    stamp "GPU tests (timeout ${TESTS_TIMEOUT} s)"
    # Only the GPU backends' rows (the CPU ones run in CI); 8 xdist workers share the GPU
    # and compile the kernels in parallel; no -x, so one failure hides nothing else.
    workers=""
    python3 -c "import xdist" 2>/dev/null && workers="-n ${TEST_WORKERS:-8}"
    # shellcheck disable=SC2086
    HYPOTHESIS_PROFILE=gpu timeout -k 5 "$TESTS_TIMEOUT" python3 -m pytest -q -p no:cacheprovider \
        $workers -rfE --durations=15 -k "${TESTS_K:-cupy or numba_cuda}" \
        tests/test_backends.py tests/test_engine.py 2>&1 | tee "$OUT/tests.log"
    tests_rc=${PIPESTATUS[0]}
fi

if [ "${SKIP_PRIMS:-0}" != 1 ]; then
    stamp "GPU primitives (timeout ${PRIMS_TIMEOUT:-60} s)"
    timeout -k 5 "${PRIMS_TIMEOUT:-60}" python3 -m bench.gpu_primitives \
        --out "$OUT/primitives.json" 2>&1 | tee "$OUT/primitives.log"
fi

stamp "GPU bench (timeout ${BENCH_TIMEOUT} s, --total ${BENCH_TOTAL})"
marker=$(mktemp)
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout -k 5 "$BENCH_TIMEOUT" python3 -m bench --gpu --total "$BENCH_TOTAL" $BENCH_ARGS 2>&1 \
    | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

# The results of this run (the report is rewritten after every item, so a timeout leaves one).
json=""
for f in $(find bench/results -maxdepth 1 -type f -newer "$marker" -name '*-gpu*' \
           ! -name 'latest*' ! -name '*.tmp' | sort); do
    cp "$f" "$OUT/" && case "$f" in *.json) json=$f ;; esac
done

{
    echo "==================== GPU CHECK SUMMARY ===================="
    if [ "$tests_rc" = skipped ]; then
        echo "tests: skipped (SKIP_TESTS=1)"
    else
        counts=$(grep -E '[0-9]+ (passed|failed|error|errors|skipped)' "$OUT/tests.log" | tail -1)
        passed=$(echo "$counts" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || true)
        failed=$(echo "$counts" | grep -oE '[0-9]+ (failed|errors?)' \
                 | awk '{s += $1} END {print s + 0}')
        verdict=PASS
        [ "$tests_rc" != 0 ] && verdict=FAIL
        [ "$tests_rc" = 124 ] && verdict="FAIL (timeout after ${TESTS_TIMEOUT} s)"
        echo "tests: $verdict  PASS ${passed:-0}  FAIL ${failed:-0}" \
             "(rc $tests_rc: ${counts:-no summary line})"
    fi
    verdict=PASS
    [ "$bench_rc" != 0 ] && verdict=FAIL
    [ "$bench_rc" = 124 ] && verdict="FAIL (timeout after ${BENCH_TIMEOUT} s)"
    echo "bench: $verdict (rc $bench_rc)"
    if [ -n "$json" ]; then
        python3 -c "import json, sys; from bench.gpu import summary_lines; \
print('\n'.join(summary_lines(json.load(open(sys.argv[1])))))" "$json" \
            || echo "(could not summarise $json)"
    else
        echo "no bench results were written"
    fi
    echo "files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    echo "elapsed: $(( $(date +%s) - t0 )) s"
} 2>&1 | tee "$OUT/summary.txt"
rm -f "$marker"
[ "$tests_rc" = 0 ] || [ "$tests_rc" = skipped ] && [ "$bench_rc" = 0 ]
