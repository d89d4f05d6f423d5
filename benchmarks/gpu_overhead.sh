#!/usr/bin/env bash
# The next measurements of issue 15 in one device call (an nvidia-h200-x2 machine: one job per GPU; on one GPU the
# jobs run one after the other). Each job writes its log under $OUT; the tables print last.
# Usage (device tool): bash benchmarks/gpu_overhead.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
Q="python3 -m benchmarks.quant_overhead --iters 6"
GPUS=$(nvidia-smi -L | wc -l)
job0() {  # ResNet-18@224 again: the 4-pass step was 4.63x (session 7), 5.36x (session 8), 4.78x (session 9)
  timeout 450 $Q --models resnet18@224:b256 --settings float_cg,w4_cg,multi_cg,w4_data_cg,multi_data_cg --rounds 5 \
    > "$OUT/r18.log" 2>&1
}
job1() {  # compile seconds on cold caches, one process each (the target: bits as data <= 2x float; session 9
  # stacked the BN statistics of data mode: 2.5-2.8x on the H200 before it), then every CUDA test of bits as data
  # (compiled BN statistics, CUDA-graph training: not yet run on the stacked storage) and of the kernels
  for s in float_c w4_data_cg; do
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) timeout 150 $Q --models resnet18@224:b256 \
      --iters 4 --settings $s > "$OUT/cold_$s.log" 2>&1
  done
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/hasb/test_bits_as_data.py tests/hasb/test_kernels.py \
    > "$OUT/test.log" 2>&1
}
if [ "$GPUS" -ge 2 ]; then
  (CUDA_VISIBLE_DEVICES=0 job0) &
  (CUDA_VISIBLE_DEVICES=1 job1) &
  wait
else
  job0
  job1
fi
tail -1 "$OUT/test.log"
for f in "$OUT"/*.log; do echo "== $f"; grep -h "^\[[a-z_0-9@:]*\] \|^| [a-z]" "$f" | grep -v "^| model" | cut -c1-220; done
