#!/usr/bin/env bash
# The next measurements of issue 15 in one device call on an `nvidia-h200` (one GPU: eager steps are bound by the
# host, so nothing else may run beside them).  Each job writes its log under $OUT; the tables print last.
# Usage (device tool): bash benchmarks/gpu_overhead.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
Q="python3 -m benchmarks.quant_overhead --iters 6"
# 1. the kernel tests, with session 11's pass kernels (their scale-gradient test was amended without a GPU)
timeout 120 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/hasb/test_kernels.py > "$OUT/test.log" 2>&1
# 2. eager steps with the pass kernels (session 11: R18 1.318x [0.983, 1.767], MBV2 2.027x over 3 rounds; the
#    float step varied between rounds, so 8 rounds)
timeout 150 $Q --models resnet18@224:b256 --rounds 8 --settings float,w4_kernels,multi_kernels > "$OUT/r18.log" 2>&1
timeout 150 $Q --models mobilenet_v2@224:b128 --rounds 8 --settings float,w4_kernels > "$OUT/mbv2.log" 2>&1
# 3. the host cost per quantizer call, with the one-pass weight rows that session 11's call cut
timeout 60 python3 benchmarks/host_cost.py > "$OUT/host.log" 2>&1
# 4. where MobileNetV2's compiled W4A4 step (1.36x; target 1.3x) spends its kernels
timeout 200 $Q --models mobilenet_v2@224:b128 --rounds 2 --settings float_c,w4_c --profile 30 > "$OUT/mbv2_prof.log" 2>&1
grep -E "passed|failed" "$OUT/test.log" | tail -3
cat "$OUT/host.log"
for f in "$OUT"/r18.log "$OUT"/mbv2.log "$OUT"/mbv2_prof.log; do
  echo "== $f"; grep -h "^\[[a-z_0-9@:]*\] \|^| [a-z]\|profile\]" "$f" | grep -v "^| model" | cut -c1-220
done
