"""Evidence for issue 4 on real Fashion-MNIST (ResNet-20), one GPU call (≤ 9 min on an H100).

Runs, each through the library entry point ``hasb.train.train``:
  A  multi-precision {8,6,4,2}, ALRS code                 (E_m epochs, default 2; E_s default 1)
  B  multi-precision {8,6,4,2}, ALRS off                  (E_m epochs)   → Table 4 (ALRS on vs off)
  C  separately trained LSQ model per bit (= multi-precision with one candidate bit, E_m epochs each) → Table 6
  S  sensitivity of A (analysis.sensitivity, layer-restricted Hutchinson)
  D  supernet from A, HASB sampler                        (E_s epochs)
  U  supernet from A, uniform sampler                     (E_s epochs)
Then evaluates on the validation split: uniform sub-nets per bit (TBN (b,b) entries) for D and U, and the same K
random mixed configs for D and U scored two ways — Transitional BN as trained vs BN re-calibration on 1024
calibration images — and times one quantized bit pass and the 4-pass multi-precision step ÷ a float step
(same model, batch, optimizer; eager and torch.compile).

GPU (the lead):  HASB_DATA_DIR=.data/fashion-mnist PYTHONPATH=. python3 benchmarks/train_evidence.py --out $OUT
                 (carry .data; ~7-8 min on an H100 by the quick run's timings; --compiled-multi adds ~2.5 min)
CPU check:       python benchmarks/train_evidence.py --quick --out /tmp/ev
Prints a table last; writes evidence.json / evidence.md and every run directory under --out.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import hasb
from hasb.data import batches, load_dataset
from hasb.models import build_model
from hasb.recipes import sensitivity_for
from hasb.supernet import recalibrate_bn
from hasb.train import TrainConfig, evaluate, load_supernet, param_groups, train

BITS = [8, 6, 4, 2]


def log(msg: str) -> None:
    print(f"[evidence {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cfg: TrainConfig) -> tuple[Path, float]:
    t = time.time()
    train(cfg)
    return Path(cfg.out), time.time() - t


def last_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())[-1]


def random_configs(layers: list[str], k: int, seed: int) -> list[hasb.BitConfig]:
    rng = random.Random(seed)
    out = []
    for i in range(k):
        # spread the average bit: per config a bias towards low or high bits
        w = [rng.random() for _ in BITS]
        out.append(hasb.BitConfig({n: rng.choices(BITS, weights=w)[0] for n in layers}))
    return out


def spearman(a: list[float], b: list[float]) -> float:
    import scipy.stats
    if len(a) < 3:
        return float("nan")
    return float(scipy.stats.spearmanr(a, b).statistic)


@torch.no_grad()
def score_configs(model_pt: Path, configs, splits, device, calib_batches) -> dict:
    model = load_supernet(model_pt).to(device)
    res = {"uniform": {}, "tbn": [], "recal": []}
    for b in BITS:
        res["uniform"][b] = evaluate(model, splits.val, b, device=device)[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for c in configs:
        res["tbn"].append(evaluate(model, splits.val, c, device=device)[0])
        recalibrate_bn(model, c, calib_batches)
        res["recal"].append(evaluate(model, splits.val, c, device=device)[0])
        model.load_state_dict(state)     # recalibration is per config
    return res


def step_times(model_name: str, device: torch.device, batch: int, bf16: bool, iters: int,
               compiled_multi: bool = False) -> dict:
    """ms per optimizer step: float; one quantized 8-bit pass; the 4-pass multi-precision step. Eager and compiled."""
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    out = {}

    def timed(fn) -> float:
        ts = []
        for i in range(iters + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                ts.append(time.perf_counter() - t)
        ts.sort()
        return 1000 * ts[len(ts) // 2]

    for compiled in (False, True):
        if compiled and device.type != "cuda":
            continue
        torch.manual_seed(0)
        fm = build_model(model_name).to(device).train()
        fopt = torch.optim.Adam(fm.parameters(), 1e-3)
        ffwd = torch.compile(fm) if compiled else fm

        qm = hasb.quantize_model(build_model(model_name)).to(device).train()
        hasb.init_quantizers(qm, x[:64])
        qopt = torch.optim.Adam(param_groups(qm, 5e-5), 1e-3)
        qfwd = torch.compile(qm) if compiled else qm

        def step(fwd, opt):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(fwd(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def one_pass():
            hasb.set_config(qm, 8)
            step(qfwd, qopt)

        def multi():
            for b in BITS:
                hasb.set_config(qm, b)
                step(qfwd, qopt)

        tag = "compiled" if compiled else "eager"
        with_multi = not compiled or compiled_multi
        for b in (BITS if with_multi else [8]):     # compile each bit's graph before timing
            hasb.set_config(qm, b)
            step(qfwd, qopt)
        f = timed(lambda: step(ffwd, fopt))
        q = timed(one_pass)
        m = timed(multi) if with_multi else float("nan")
        out[tag] = {"float_ms": f, "w8a8_pass_ms": q, "multi4_ms": m, "pass_ratio": q / f, "multi_ratio": m / f}
        log(f"step time {tag}: float {f:.2f} ms, one pass {q:.2f} ms ({q / f:.2f}x), 4-pass {m:.2f} ms ({m / f:.2f}x)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default $OUT or runs/evidence)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU settings to check the script works")
    ap.add_argument("--model", default=None, help="default resnet20 (small_cnn with --quick)")
    ap.add_argument("--epochs-multi", type=int, default=None, help="default 2 (1 with --quick)")
    ap.add_argument("--epochs-super", type=int, default=None, help="default 1")
    ap.add_argument("--configs", type=int, default=None, help="random mixed configs scored (default 16; 4 quick)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--compiled-multi", action="store_true",
                    help="also time the compiled 4-pass step (compiles 4 more graphs: ~2.5 extra minutes on an H100)")
    a = ap.parse_args(argv)
    import os
    out = Path(a.out or os.environ.get("OUT") or "runs/evidence")
    out.mkdir(parents=True, exist_ok=True)
    quick = a.quick
    model = a.model or ("small_cnn" if quick else "resnet20")
    em = a.epochs_multi or (1 if quick else 2)
    es = a.epochs_super or 1
    k = a.configs or (4 if quick else 16)
    dev = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) else
                       ("cpu" if a.device == "auto" else a.device))
    gpu = dev.type == "cuda"
    lim = dict(train_limit=1024, val_limit=500) if quick else {}
    common = dict(model=model, batch_size=a.batch_size, device=str(dev), bf16=gpu, progress=False, overwrite=True,
                  augment=not quick, **lim)
    t_all = time.time()
    res: dict = {"model": model, "device": torch.cuda.get_device_name(0) if gpu else "cpu", "epochs_multi": em,
                 "epochs_super": es, "runs": {}}

    log("A: multi-precision, ALRS code")
    pa, ta = run(TrainConfig(stage="multi", out=str(out / "multi_alrs"), epochs=em, alrs="code", **common))
    log("B: multi-precision, ALRS off")
    pb, tb = run(TrainConfig(stage="multi", out=str(out / "multi_noalrs"), epochs=em, alrs="off", **common))
    res["runs"]["multi_alrs"] = {**last_metrics(pa), "seconds": ta}
    res["runs"]["multi_noalrs"] = {**last_metrics(pb), "seconds": tb}
    sep = {}
    for b in BITS:
        log(f"C: separate LSQ model at {b} bits")
        pc, tc = run(TrainConfig(stage="multi", out=str(out / f"single_{b}"), epochs=em, bits=[b],
                                 distill="none", **common))
        sep[b] = {**last_metrics(pc), "seconds": tc}
    res["runs"]["separate"] = sep

    log("S: sensitivity of the multi-precision model")
    t = time.time()
    sens = sensitivity_for(pa / "model.pt", out, dict(train_limit=lim.get("train_limit"), val_limit=lim.get("val_limit")),
                           max_hvp=64 if quick else 256, device=str(dev))
    res["sensitivity_seconds"] = time.time() - t
    sup = dict(common, model=model, lr=common.get("lr", 2e-3) / 4, warmup_epochs=0 if es < 3 else None)
    log("D: HASB supernet")
    pd_, td = run(TrainConfig(stage="supernet", out=str(out / "super_hasb"), epochs=es, init=str(pa / "model.pt"),
                              sampler="hasb" if sens else "uniform", sensitivity=str(sens) if sens else None, **sup))
    log("U: uniform-sampler supernet")
    pu, tu = run(TrainConfig(stage="supernet", out=str(out / "super_uniform"), epochs=es, init=str(pa / "model.pt"),
                             sampler="uniform", **sup))
    res["runs"]["super_hasb"] = {**last_metrics(pd_), "seconds": td, "sampler": "hasb" if sens else "uniform"}
    res["runs"]["super_uniform"] = {**last_metrics(pu), "seconds": tu}

    log("scoring sub-nets: TBN vs BN re-calibration")
    splits = load_dataset(**lim)
    calib = list(batches(splits.calib, 256, device=dev))
    layers = hasb.searchable_layers(load_supernet(pa))
    cost = hasb.CostModel.from_model(load_supernet(pa))
    configs = random_configs(layers, k, seed=0)
    avg_bits = [cost.avg_bit_equivalent(c) for c in configs]
    scores = {}
    for name, p in (("multi", pa), ("hasb", pd_), ("uniform", pu)):
        scores[name] = score_configs(p / "model.pt", configs, splits, dev, calib)
    res["subnets"] = {"avg_bit_equivalent": avg_bits, "configs": [c.short() for c in configs], "scores": scores}
    if not a.skip_timing:
        log("step times")
        res["step_time"] = step_times(model, dev, 256, gpu, 20 if gpu else 3, a.compiled_multi)
    res["total_seconds"] = time.time() - t_all
    (out / "evidence.json").write_text(json.dumps(res, indent=2, default=str))
    md = table(res)
    (out / "evidence.md").write_text(md)
    print(md)
    return 0


def table(res: dict) -> str:
    r = res["runs"]
    L = [f"## Training evidence: {res['model']} on Fashion-MNIST ({res['device']}); multi {res['epochs_multi']} "
         f"epochs, supernet {res['epochs_super']} epochs; total {res['total_seconds']:.0f} s", "",
         "| val acc % | w8a8 | w6a6 | w4a4 | w2a2 | seconds |", "|---|---|---|---|---|---|"]

    def row(name, m, secs):
        return f"| {name} | " + " | ".join(f"{100 * m[f'acc_w{b}a{b}']:.2f}" for b in BITS) + f" | {secs:.0f} |"

    L.append(row("multi-precision, ALRS code", r["multi_alrs"], r["multi_alrs"]["seconds"]))
    L.append(row("multi-precision, ALRS off", r["multi_noalrs"], r["multi_noalrs"]["seconds"]))
    sep = r["separate"]
    L.append("| separate LSQ per bit | " + " | ".join(f"{100 * sep[b][f'acc_w{b}a{b}']:.2f}" for b in BITS)
             + f" | {sum(s['seconds'] for s in sep.values()):.0f} |")
    sn = res["subnets"]["scores"]
    for name in ("hasb", "uniform"):
        L.append(f"| supernet {name} sampler (TBN b-b) | " + " | ".join(f"{100 * sn[name]['uniform'][b]:.2f}"
                                                                       for b in BITS)
                 + f" | {r['super_' + name]['seconds']:.0f} |")
    L += ["", "Random mixed configs (same configs for every model; mean val acc %, avg-bit equivalent "
          f"{min(res['subnets']['avg_bit_equivalent']):.2f}–{max(res['subnets']['avg_bit_equivalent']):.2f}):", "",
          "| model | TBN / per-bit BN as trained | BN re-calibrated (1024 imgs) | Spearman(TBN, recal) |",
          "|---|---|---|---|"]
    for name in ("multi", "hasb", "uniform"):
        s = sn[name]
        mt, mr = sum(s["tbn"]) / len(s["tbn"]), sum(s["recal"]) / len(s["recal"])
        L.append(f"| {name} | {100 * mt:.2f} | {100 * mr:.2f} | {spearman(s['tbn'], s['recal']):.2f} |")
    if "step_time" in res:
        L += ["", "| step time (ResNet b256) | float ms | one w8a8 pass | ratio | 4-pass multi step | ratio |",
              "|---|---|---|---|---|---|"]
        for tag, s in res["step_time"].items():
            L.append(f"| {tag} | {s['float_ms']:.2f} | {s['w8a8_pass_ms']:.2f} | {s['pass_ratio']:.2f}x | "
                     f"{s['multi4_ms']:.2f} | {s['multi_ratio']:.2f}x |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
