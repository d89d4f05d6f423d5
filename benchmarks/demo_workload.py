"""Find a demo workload where bits matter: small_cnn supernets on all of Fashion-MNIST (one GPU).

Trains the one-shot pipeline (multi-precision → Hessian traces of the float twin → HASB supernet) for small_cnn
at two widths, then scores the uniform configs and random mixed configs on the 5,000 held-out validation images
(BN re-calibrated on 1,024 training images) and prints, per width, the w8 − w2 gap and the spread of mixed configs
against the binomial standard error. Usage (one GPU, data carried in .data/):

    HASB_DATA_DIR=.data/fashion-mnist python -m benchmarks.demo_workload --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

from hasb.config import BitConfig
from hasb.data import load_dataset
from hasb.quantize import searchable_layers
from hasb.recipes import run_recipe
from hasb.train import TrainConfig, load_supernet
from search.evaluate import Evaluator


def make_cfg(width_epochs, device="cuda", **extra):
    epochs_multi, epochs_super = width_epochs

    def mk(stage, out, **kw):
        base = dict(
            stage=stage,
            model="small_cnn",
            out=out,
            epochs=epochs_multi if stage == "multi" else epochs_super,
            batch_size=256,
            lr=3e-3 if stage == "multi" else 1e-3,
            wd=5e-5,
            augment=True,
            device=device,
            warmup_epochs=1,
            **extra,
        )
        base.update(kw)
        return TrainConfig(**base)

    return mk


def score(model_pt: Path, n_random: int, device: str, seed: int = 0, **limits) -> list[dict]:
    model = load_supernet(model_pt).to(device)
    s = load_dataset("fashion-mnist", **limits)
    ev = Evaluator(model, (s.val, s.calib), device=device)
    layers = searchable_layers(model)
    rows = []
    for b in (8, 6, 4, 3, 2):
        if b not in (8, 6, 4, 2):
            continue
        cfg = BitConfig({n: (b, b) for n in layers})
        r = ev.evaluate(cfg, save=False)
        rows.append(dict(config=f"w{b}a{b}", acc=r.accuracy, loss=r.loss, n=r.n))
    rng = random.Random(seed)
    for _ in range(n_random):
        bits = [rng.choice((8, 6, 4, 2)) for _ in layers]
        r = ev.evaluate(BitConfig({n: (b, b) for n, b in zip(layers, bits, strict=False)}), save=False)
        rows.append(dict(config="-".join(map(str, bits)), acc=r.accuracy, loss=r.loss, n=r.n))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--random", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="CPU, 512 images, 1+1 epochs: checks the script runs")
    a = p.parse_args()
    dev = "cpu" if a.smoke else "cuda"
    lim = dict(train_limit=512, val_limit=256) if a.smoke else {}
    out = Path(a.out)
    summary = {}
    for name, epochs in (("smoke", (1, 1)),) if a.smoke else (("e12_6", (12, 6)),):
        t0 = time.time()
        res = run_recipe(
            make_cfg(epochs, dev, **lim),
            out / name,
            sensitivity_splits=lim,
            max_hvp=32 if a.smoke else 256,
            progress=False,
        )
        rows = score(res["supernet"], 2 if a.smoke else a.random, dev, **lim)
        secs = time.time() - t0
        (out / name / "scores.json").write_text(json.dumps(rows, indent=1))
        summary[name] = (rows, secs)
    for name, (rows, secs) in summary.items():
        uni = {r["config"]: r["acc"] for r in rows[:4]}
        mixed = [r["acc"] for r in rows[4:]]
        n = rows[0]["n"]
        se = math.sqrt(0.9 * 0.1 / n)
        print(
            f"{name}: {secs:.0f} s; uniform "
            + " ".join(f"{k}={100 * v:.2f}" for k, v in uni.items())
            + f"; mixed min/median/max {100 * min(mixed):.2f}/{100 * sorted(mixed)[len(mixed) // 2]:.2f}/"
            f"{100 * max(mixed):.2f}; SE≈{100 * se:.2f} pt on {n} val images"
        )
    shutil.copy(__file__, out / "demo_workload.py")


if __name__ == "__main__":
    main()
