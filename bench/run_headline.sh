#!/usr/bin/env bash
# Regenerate the headline numbers of README.md / bench/README.md into bench/results/:
#   1. shrink the bundled all-MiniLM-L6-v2 by 50 % of its heads (shrink's defaults, BBC News calibration)
#   2. export dense and pruned to ONNX (fp32, ORT-fused, int8)
#   3. bench dense vs pruned: torch (eager, SDPA) and ONNX Runtime (fp32 / optimised / int8),
#      batch 1/8/32 x seq 128/512, dense and pruned interleaved
#   4. eval: embedding cosine to dense and BBC News 5-topic k-NN accuracy
#   5. sweep 0.1-0.7 from one scoring pass: quality vs latency table and Pareto plot
#
# Run it on a quiet machine (nothing else running): latency numbers are only as good as the machine.
#   bash bench/run_headline.sh                      # full run (tens of minutes on a laptop CPU)
# Every setting can be overridden from the environment, e.g. a smoke test in a minute or two:
#   OUT=/tmp/headline-smoke BATCHES=1 SEQS=16 RATIOS=0.3,0.6 MIN_TIME=0 SWEEP_MIN_TIME=0 RUNS=2 WARMUP=0 \
#     CALIB_SAMPLES=8 EVAL_SAMPLES=16 TRAIN_SAMPLES=40 SWEEP_BATCH=1 SWEEP_SEQ=16 \
#     BACKENDS=torch-sdpa-cpu,ort-cpu,ort-int8-cpu bash bench/run_headline.sh
# THREADS must not exceed the cores that are really free: an oversubscribed OpenMP pool spins and
# inflates torch latency by an order of magnitude.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
OUT=${OUT:-bench/results}
MODEL=${MODEL:-all-MiniLM-L6-v2}
PRUNE=${PRUNE:-0.5}
BACKENDS=${BACKENDS:-torch,ort}
BATCHES=${BATCHES:-1,8,32}
SEQS=${SEQS:-128,512}
RATIOS=${RATIOS:-0.1,0.2,0.3,0.4,0.5,0.6,0.7}
# physical cores by default: hyper-threads add noise, not speed, to these matmul-bound runs
THREADS=${THREADS:-$("$PYTHON" -c "import torch; print(max(1, torch.get_num_threads()))")}
WARMUP=${WARMUP:-10}
RUNS=${RUNS:-10}
MIN_TIME=${MIN_TIME:-10}
SWEEP_MIN_TIME=${SWEEP_MIN_TIME:-$MIN_TIME}
SWEEP_BATCH=${SWEEP_BATCH:-8}
SWEEP_SEQ=${SWEEP_SEQ:-128}
CALIB_SAMPLES=${CALIB_SAMPLES:-384}  # shrink's default (headslim.data.DEFAULT_CALIB_SAMPLES)
EVAL_SAMPLES=${EVAL_SAMPLES:-}    # empty: every BBC News test article
TRAIN_SAMPLES=${TRAIN_SAMPLES:-}  # empty: every BBC News train article for the k-NN

# checkpoints and ONNX files are large: they go to a scratch dir, only reports go to $OUT
WORK=${WORK:-$(mktemp -d -t headslim-headline.XXXXXX)}

# PYTHONSAFEPATH: `-m` would put this repository's root first on sys.path, where ./kernels shadows the
# PyPI `kernels` package that transformers 5.25 imports
hs() { PYTHONSAFEPATH=1 "$PYTHON" -m headslim.cli "$@"; }
eval_args=(--data bbc-news)
[[ -n "$EVAL_SAMPLES" ]] && eval_args+=(--eval-samples "$EVAL_SAMPLES")
[[ -n "$TRAIN_SAMPLES" ]] && eval_args+=(--train-samples "$TRAIN_SAMPLES")
timing=(--threads "$THREADS" --warmup "$WARMUP" --runs "$RUNS")

mkdir -p "$OUT"
slim="$WORK/minilm-slim"
echo "== shrink $MODEL by $PRUNE"
hs shrink "$MODEL" --prune "$PRUNE" --calib bbc-news --calib-samples "$CALIB_SAMPLES" --out "$slim" \
  --overwrite --no-progress | tee "$OUT/shrink.txt"

onnx_args=()
if [[ "$BACKENDS" == *ort* ]] && "$PYTHON" -c "import headslim.export" 2>/dev/null; then
  echo "== export dense and pruned to ONNX"
  if hs export "$MODEL" --out "$WORK/onnx-dense" --optimize --quantize int8 --prefer unfused --overwrite > /dev/null \
     && hs export "$slim" --out "$WORK/onnx-slim" --optimize --quantize int8 --prefer unfused --overwrite > /dev/null
  then
    onnx_args=(--onnx-dense "$WORK/onnx-dense" --onnx-pruned "$WORK/onnx-slim")
  else  # bench then reports, per ORT backend, why it could not run; torch numbers still come
    echo "export failed (see above): the ort backends will say why they are skipped"
  fi
fi

echo "== bench ($BACKENDS; batch $BATCHES x seq $SEQS; $THREADS threads)"
hs bench "$slim" --baseline "$MODEL" --backend "$BACKENDS" --batch "$BATCHES" --seq "$SEQS" "${timing[@]}" \
  --min-time "$MIN_TIME" ${onnx_args[@]+"${onnx_args[@]}"} --out "$OUT/bench" --overwrite | tee "$OUT/bench.txt"

echo "== eval"
hs eval "$slim" --baseline "$MODEL" "${eval_args[@]}" --out "$OUT/eval" --overwrite | tee "$OUT/eval.txt"

echo "== sweep $RATIOS"
hs sweep "$MODEL" --prune "$RATIOS" --calib bbc-news --calib-samples "$CALIB_SAMPLES" "${eval_args[@]}" \
  --backend torch-sdpa-cpu --batch "$SWEEP_BATCH" --seq "$SWEEP_SEQ" "${timing[@]}" --min-time "$SWEEP_MIN_TIME" --no-progress \
  --out "$OUT/sweep" --overwrite | tee "$OUT/sweep.txt"

echo "== done: $OUT/bench/bench.md, $OUT/eval/eval.md, $OUT/sweep/sweep.md (+ bench.png, pareto.png)"
