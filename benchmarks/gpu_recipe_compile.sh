#!/usr/bin/env bash
# Issue 15's last target, "training curves unchanged on the recipe": the ResNet-20 GPU recipe eager (GPU 0) and with
# --compile (GPU 1: CUDA graphs; specialised graphs in the multi-precision stage, bits as data in the supernet
# stage) side by side from the same seed, then each stage's validation accuracy per epoch and bit, and the epoch
# seconds, both runs in one table. One seed: a first look at whether the curves agree within run-to-run noise, not
# evidence (that needs seeds). Usage (device tool, nvidia-h200-x2, carry [".whl", ".data"]):
#   BITS=4,3,2 bash benchmarks/gpu_recipe_compile.sh     (BITS unset: the recipe's 8,6,4,2, ~390 s eager)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HASB_DATA_DIR=$PWD/.data/fashion-mnist
B=${BITS:+--bits $BITS}
LIMIT=${LIMIT:-560}
# shellcheck disable=SC2086  # $B: empty or two words
(CUDA_VISIBLE_DEVICES=0 timeout "$LIMIT" python3 -m hasb.recipes resnet20-gpu --out runs/eager $B \
  > "$OUT/eager.log" 2>&1; echo "rc=$?" >> "$OUT/eager.log") &
# shellcheck disable=SC2086
(CUDA_VISIBLE_DEVICES=1 timeout "$LIMIT" python3 -m hasb.recipes resnet20-gpu --out runs/compiled --compile $B \
  > "$OUT/compiled.log" 2>&1; echo "rc=$?" >> "$OUT/compiled.log") &
wait
for r in eager compiled; do
  for s in multi supernet; do cp "runs/$r/$s/metrics.csv" "$OUT/${r}_$s.csv" 2>/dev/null; done
  tail -1 "$OUT/$r.log"
done
python3 - "$OUT" <<'PY'
import csv, sys
from pathlib import Path

out = Path(sys.argv[1])
for stage in ("multi", "supernet"):
    runs = {r: list(csv.DictReader(open(f))) for r in ("eager", "compiled") if (f := out / f"{r}_{stage}.csv").exists()}
    if not runs:
        continue
    accs = [k for k in next(iter(runs.values()))[0] if k.startswith("acc_")]
    print(f"\n{stage}: validation accuracy % per epoch, eager / compiled; epoch seconds eager / compiled")
    print("| epoch | " + " | ".join(a[4:] for a in accs) + " | s |")
    print("|---" * (len(accs) + 2) + "|")
    for i in range(max(len(v) for v in runs.values())):
        rows = [v[i] if i < len(v) else {} for v in runs.values()]
        cell = lambda k, f: " / ".join(f(r[k]) if k in r else "–" for r in rows)
        print(f"| {i + 1} | " + " | ".join(cell(a, lambda v: f"{100 * float(v):.2f}") for a in accs)
              + f" | {cell('epoch_s', lambda v: f'{float(v):.0f}')} |")
PY
