#!/usr/bin/env bash
# One device call that runs the LM recipe and the vision evidence side by side on one GPU (each leaves most of
# the GPU idle), then flattens what comes back into $OUT. Usage (device tool): bash benchmarks/gpu_session.sh
# Needs .whl (optuna and its pure-Python deps for the image's Python 3.12) and .data/fashion-mnist carried.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HASB_DATA_DIR=$PWD/.data/fashion-mnist
LIMIT=${LIMIT:-540}
mkdir -p ev_out runs
[ -d carry/ev ] && cp -r carry/ev/. ev_out/  # cells of an earlier call: the evidence resumes
[ -d carry/lm_gpu ] && cp -r carry/lm_gpu runs/lm_gpu
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# the kernels are on by default: their CUDA tests first; if any fails, this call runs on the composite
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/hasb/test_kernels.py > "$OUT/kernel_tests.log" 2>&1 \
    || { echo "kernel tests failed: HASB_KERNELS=0"; export HASB_KERNELS=0; }
tail -2 "$OUT/kernel_tests.log"
[ "${LM:-1}" = 1 ] && (timeout $((LIMIT + 15)) python3 -m hasb.recipes lm-gpu --out runs/lm_gpu > "$OUT/lm_gpu.log" 2>&1; echo "rc=$?" >> "$OUT/lm_gpu.log") &
# ARMS=g LM=0: issue 15's "training curves unchanged" (--compile against eager over 3 seeds) alone; unset: all arms
# shellcheck disable=SC2086  # ${ARMS:+...}: nothing or two words
timeout $((LIMIT + 20)) python3 -m benchmarks.evidence --workload "${WORKLOAD:-mbv2-fmnist}" --out ev_out \
    ${ARMS:+--arms $ARMS} --jobs "${JOBS:-6}" --time-limit "$LIMIT" > "$OUT/evidence.log" 2>&1
wait
# few files come back: the LM's small outputs travel as one tar
tar -C runs -cf "$OUT/lm_gpu_small.tar" --exclude='*.pt' --exclude='*.tmp' lm_gpu 2>/dev/null
cp ev_out/evidence.md "$OUT/" 2>/dev/null
tar -cf "$OUT/ev_cells.tar" -C ev_out cells settings.json 2>/dev/null
tail -5 "$OUT/lm_gpu.log"; tail -60 "$OUT/evidence.log"
