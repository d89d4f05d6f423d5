#!/usr/bin/env bash
# Issue 15's compiled measurements for one model in one device call on an `nvidia-h200` (CUDA graphs, interleaved
# rounds): W4A4 as hasb compiles it (the activations' backward one kernel op after batch norms, a pass's weights
# one op each way) against the same step with each layer's weight left to inductor (w4_layerw_cg, before
# session 18), and the 4-pass step.  Each compile takes 30-110 s (the
# 4-pass step's four graphs 98 s on ResNet-18); the time limits add up to 560 s, inside one 600 s device call.
# Usage (device tool): bash benchmarks/gpu_compiled.sh resnet18@224:b256 [settings]
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MODEL=${1:-resnet18@224:b256}
SETTINGS=${2:-float_cg,w4_cg,w4_layerw_cg,multi_cg}
timeout 90 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/hasb/test_kernels.py -k "compiled or launch or traced" \
  > "$OUT/test.log" 2>&1
tail -1 "$OUT/test.log"
# the CUDA-graph training tests (hasb train --compile: bits as data for the supernet stage; 152 s in session 15)
timeout 170 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/hasb/test_bits_as_data.py -k cuda \
  > "$OUT/test_data.log" 2>&1
tail -1 "$OUT/test_data.log"
timeout 300 python3 -m benchmarks.quant_overhead --models "$MODEL" --settings "$SETTINGS" --rounds 6 --iters 6 \
  > "$OUT/compiled.log" 2>&1
grep -h "first_s\|^| [a-z]\|per round" "$OUT/compiled.log" | grep -v "^| model" | cut -c1-200
