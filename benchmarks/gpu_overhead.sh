#!/usr/bin/env bash
# The next measurements of issue 15 in one device call (an nvidia-h200-x2 machine: one job per GPU; on one GPU the
# jobs run one after the other). Each job writes its log under $OUT; the tables print last.
# Usage (device tool): bash benchmarks/gpu_overhead.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
Q="python3 -m benchmarks.quant_overhead --iters 6"
GPUS=$(nvidia-smi -L | wc -l)
job0() {  # ResNet-18@224: CUDA graphs for bits as data, one pass and the 4-pass step (forward + loss in one graph)
  timeout 280 $Q --models resnet18@224:b256 --settings float_c,w4_c,w4_data_cg,multi_data_cg --profile 8 \
    > "$OUT/r18.log" 2>&1
}
job1() {  # the language model after the memory-order change, then MobileNetV2 with CUDA graphs
  timeout 130 $Q --models lm_small@256:b64 --settings float_c,w4_c,w4_data_cg > "$OUT/lm.log" 2>&1
  timeout 150 $Q --models mobilenet_v2@224:b128 --settings float_c,w4_c,w4_data_cg > "$OUT/mbv2.log" 2>&1
}
if [ "$GPUS" -ge 2 ]; then
  (CUDA_VISIBLE_DEVICES=0 job0) &
  (CUDA_VISIBLE_DEVICES=1 job1) &
  wait
else
  job0
  job1
fi
for f in "$OUT"/*.log; do echo "== $f"; grep -h "^\[[a-z_0-9@:]*\] \|^| [a-z]" "$f" | grep -v "^| model" | cut -c1-220; done
