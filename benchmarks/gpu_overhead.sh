#!/usr/bin/env bash
# Issue 15's eager measurements in one device call on an `nvidia-h200` (one GPU: eager steps are bound by the
# host, so nothing else may run beside them).  Each job writes its log under $OUT; the tables print last.
# Usage (device tool): bash benchmarks/gpu_overhead.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
Q="python3 -m benchmarks.quant_overhead --iters 6"
# 1. the kernel tests
timeout 100 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/hasb/test_kernels.py > "$OUT/test.log" 2>&1
# 2. where the eager step's extra time goes, its host share (session 13: 137 of 216 µs per layer for MobileNetV2's
#    activations) and what the direct launches save (--jit-launches: every launch through Triton's JIT)
timeout 200 python3 -m benchmarks.eager_host --models mobilenet_v2@224:b128,resnet18@224:b256 --rounds 8 --host-share --jit-launches \
  > "$OUT/eager_host.log" 2>&1
# 3. the targets: eager W4A4 ÷ eager float (session 14: ResNet-18 1.168x; MobileNetV2 1.529x [1.424, 1.641] over
#    16 rounds; session 15: 1.600x [1.551, 1.650] over 60 rounds, 78 s; the host's state moves it, so many rounds).
#    The time limits add up to 570 s, inside one 600 s device call.
timeout 150 $Q --models mobilenet_v2@224:b128 --rounds 60 --settings float,w4_kernels > "$OUT/mbv2.log" 2>&1
timeout 120 $Q --models resnet18@224:b256 --rounds 10 --settings float,w4_kernels > "$OUT/r18.log" 2>&1
grep -E "passed|failed" "$OUT/test.log" | tail -3
grep "^|\|quantized layers" "$OUT/eager_host.log"
for f in "$OUT"/mbv2.log "$OUT"/r18.log; do
  echo "== $f"; grep -h "^| [a-z]\|per round" "$f" | grep -v "^| model" | cut -c1-220
done
