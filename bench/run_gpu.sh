#!/usr/bin/env bash
# Every GPU measurement of headslim in one run, for a lent GPU machine (issues 4, 6 and 7):
#   1. the kernel parity tests at full size (tests/test_kernels.py, on CUDA: no interpreter),
#   2. the per-kernel benchmark (bench/kernels_bench.py),
#   3. `headslim bench` of all-MiniLM-L6-v2 dense vs pruned on the CUDA backends,
#   4. end to end, a Llama-3.2-1B-shaped decoder with random weights, dense vs ragged-pruned (bench/e2e_gpu.py).
#
#   DENSE=all-MiniLM-L6-v2 PLAN=plan.json CALIB=bbc-news OUT_DIR=bench/results/gpu bash bench/run_gpu.sh
#
# DENSE is the encoder checkpoint, PLAN a plan JSON (`kept_heads`) applied with `headslim shrink --plan`
# (no repair: repair changes weight values, not shapes, so not speed), CALIB any text source shrink
# accepts (it only feeds shrink's held-out check here). Each step has its own time limit and a failing
# step does not stop the others; the exit status is that of the last failing step. STEPS=tests,kernels
# (say) runs only those steps, to split the work over calls of a time-limited machine.
set -u
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-bench/results/gpu}
DENSE=${DENSE:-all-MiniLM-L6-v2}
PLAN=${PLAN:-}
CALIB=${CALIB:-bbc-news}
DTYPE=${DTYPE:-fp16}
mkdir -p "$OUT_DIR"
# PYTHONSAFEPATH: `-m` from the repository root would put ./kernels first on sys.path, shadowing the PyPI
# `kernels` package transformers 5.25 imports
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONSAFEPATH=1
status=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=$rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"

STEPS=${STEPS:-tests,kernels,e2e,bench}  # a subset, to split the run over several calls
want() { [[ ",$STEPS," == *",$1,"* ]]; }
want tests && step kernel-tests "${TEST_LIMIT:-240}" $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py
want kernels && step kernels-bench "${KERNELS_LIMIT:-300}" $PY bench/kernels_bench.py --dtype "$DTYPE" --out "$OUT_DIR/kernels"
if want bench && [ -n "$PLAN" ]; then
    slim=$(mktemp -d)/slim
    step shrink 60 $PY -m headslim shrink "$DENSE" --plan "$PLAN" --no-repair --calib "$CALIB" --out "$slim"
    torch_dtype=$([ "$DTYPE" = bf16 ] && echo bfloat16 || echo float16)
    step bench "${BENCH_LIMIT:-240}" $PY -m headslim bench "$slim" --baseline "$DENSE" \
        --backend torch-eager-cuda,torch-sdpa-cuda,triton-cuda --dtype "$torch_dtype" \
        --batch 1,8,32 --seq 128,512 --min-time "${MIN_TIME:-2}" --out "$OUT_DIR/bench" --overwrite
fi
want e2e && step e2e "${E2E_LIMIT:-240}" $PY bench/e2e_gpu.py --batch 1,16 --dtype "$DTYPE" --out "$OUT_DIR/e2e"
exit $status
