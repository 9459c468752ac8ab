#!/usr/bin/env bash
# Every embedding, dictionary and viewer figure on a GPU, in one call.
#
#   bash benchmarks/gpu_run.sh [OUT_DIR] [DEVICE]      (defaults: benchmarks/results/gpu, cuda)
#
# Runs, each with --device DEVICE, and writes one text file per benchmark into OUT_DIR:
#   bench_embed.txt       fp32 and bf16 forward against matmuls measured in the same run on the
#                         GPU, the pipeline against the bare forward, token cosines, the concept
#                         AUROCs per precision, the pipeline read from disk;
#   bench_dictionary.txt  our TopK and ICFL against EleutherAI sparsify, all on the same GPU
#                         (sparsify only where it is installed: see bench_dictionary.py's header);
#   bench_overlay.txt     the viewer (store embedded on the GPU; needs xvfb-run for napari).
# plus machine.txt (GPU, driver, torch). DEVICE=cpu runs the same script on the CPU, which is
# how it is checked on machines without a GPU. PYTHON picks the interpreter (default: python).
set -u
OUT=${1:-benchmarks/results/gpu}
DEVICE=${2:-cuda}
PY=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the benchmarks run from the repository root
cd "$(dirname "$0")/.."
status=0

run() {  # name, then the command; its output goes to OUT/name.txt and the console
  local name=$1
  shift
  echo "== $name: $*" | tee "$OUT/$name.txt"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

methods=topk,icfl-gram,icfl-plain,icfl-gram-4x8
if "$PY" -c "import sparsify" 2>/dev/null; then methods=$methods,sparsify; fi

# QUICK=1: small sizes, to check the script end to end where there is no GPU (minutes on a CPU)
if [ "${QUICK:-0}" = 1 ]; then
  embed_args=(--tiles 4 --phenom-tiles 4 --bf16-tiles 4 --batch 4 --repeats 1 --matmul-n 1024
    --skip-concepts --skip-memory --disk-sites 2)
  dict_args=(--tokens 8000 --eval 1000 --atoms 256 --batch 512 --steps 4 --round 2
    --datasets random)
  overlay_args=(--size 256 --atoms 256 --wells 2 --sites 2 --features 5 --switches 4 --clicks 3)
else
  embed_args=(--tiles 64 --phenom-tiles 32 --bf16-tiles 32 --batch 16 --repeats 3)
  dict_args=()
  overlay_args=()
fi

run bench_embed "$PY" benchmarks/bench_embed.py --device "$DEVICE" --threads "$(nproc)" \
  "${embed_args[@]}"
run bench_dictionary "$PY" benchmarks/bench_dictionary.py --device "$DEVICE" --methods "$methods" \
  --out "$OUT/bench_dictionary_table.txt" "${dict_args[@]}"
if command -v xvfb-run >/dev/null; then
  run bench_overlay xvfb-run -a -s "-screen 0 1280x1024x24" "$PY" benchmarks/bench_overlay.py \
    --device "$DEVICE" --out "$OUT/bench_overlay_table.txt" "${overlay_args[@]}"
else
  echo "bench_overlay: xvfb-run not found, skipped" | tee "$OUT/bench_overlay.txt"
fi
exit $status
