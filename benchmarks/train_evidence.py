"""Evidence for issue 4 on real Fashion-MNIST (ResNet-20), one GPU call (≤ 9 min on an H200).

Runs, each through the library entry point ``hasb.train.train``, independent ones side by side as spawned
processes on the one device (``--serial`` to run them one after another):
  A  multi-precision {8,6,4,2}, ALRS code                 (E_m epochs, default 2)
  B  multi-precision {8,6,4,2}, ALRS off                  (E_m epochs)   → Table 4 (ALRS on vs off)
  C  separately trained LSQ model per bit (= multi-precision with one candidate bit, E_m epochs each) → Table 6
  S  sensitivity of A (analysis.sensitivity, layer-restricted Hutchinson)
  D  supernet from A, HASB sampler                        (E_s epochs: as many as fit --deadline, ≤ 6)
  U  supernet from A, uniform sampler                     (E_s epochs)
  --with-432: also multi {4,3,2} → its sensitivity → HASB supernet (the search evidence's w3a3 comparison)
Then evaluates on the validation split: uniform sub-nets per bit (TBN (b,b) entries) for D and U, and the same K
random mixed configs for A, D and U scored two ways — Transitional BN as trained vs BN re-calibration on 1024
calibration images (paired HASB − uniform difference) — and, unless --skip-timing, times one quantized bit pass
and the 4-pass multi-precision step ÷ a float step (same model, batch, optimizer; eager and torch.compile) with
the device to itself.

GPU:        HASB_DATA_DIR=.data/fashion-mnist PYTHONPATH=. python3 benchmarks/train_evidence.py --out /tmp/ev \
                --epochs-multi 4 --with-432 --skip-timing --deadline 555          (446 s on an H200)
CPU check:  python benchmarks/train_evidence.py --quick --with-432 --skip-timing --out /tmp/ev
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
    for _i in range(k):
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
        model.load_state_dict(state)  # recalibration is per config
    return res


def step_times(
    model_name: str, device: torch.device, batch: int, bf16: bool, iters: int, compiled_multi: bool = False
) -> dict:
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

        def one_pass(qm=qm, qfwd=qfwd, qopt=qopt):
            hasb.set_config(qm, 8)
            step(qfwd, qopt)

        def multi(qm=qm, qfwd=qfwd, qopt=qopt):
            for b in BITS:
                hasb.set_config(qm, b)
                step(qfwd, qopt)

        tag = "compiled" if compiled else "eager"
        with_multi = not compiled or compiled_multi
        for b in BITS if with_multi else [8]:  # compile each bit's graph before timing
            hasb.set_config(qm, b)
            step(qfwd, qopt)
        f = timed(lambda ffwd=ffwd, fopt=fopt: step(ffwd, fopt))
        q = timed(one_pass)
        m = timed(multi) if with_multi else float("nan")
        out[tag] = {"float_ms": f, "w8a8_pass_ms": q, "multi4_ms": m, "pass_ratio": q / f, "multi_ratio": m / f}
        log(f"step time {tag}: float {f:.2f} ms, one pass {q:.2f} ms ({q / f:.2f}x), 4-pass {m:.2f} ms ({m / f:.2f}x)")
    return out


# ---------------------------------------------------------------------------------------------------- tasks
# Each task runs in its own (spawned) process: ResNet-20 on 28×28 images keeps an H100 mostly idle between kernel
# launches, so independent runs side by side finish several times sooner than one after another.
def _task_train(cfg: dict) -> dict:
    out, secs = run(TrainConfig.from_dict(cfg))
    return {**last_metrics(out), "seconds": secs, "epochs": cfg["epochs"]}


def _task_sens(multi_pt: str, out: str, lim: dict, max_hvp: int, device: str) -> dict:
    t = time.time()
    Path(out).mkdir(parents=True, exist_ok=True)
    p = sensitivity_for(Path(multi_pt), Path(out), lim, max_hvp=max_hvp, device=device)
    return {"path": str(p) if p else None, "seconds": time.time() - t}


def _task_score(model_pt: str, configs: list, lim: dict, device: str) -> dict:
    dev = torch.device(device)
    splits = load_dataset(**lim)
    calib = list(batches(splits.calib, 256, device=dev))
    return score_configs(Path(model_pt), [hasb.BitConfig.from_dict(c) for c in configs], splits, dev, calib)


def _entry(fn_name: str, args: tuple, result_path: str, log_path: str) -> None:
    import contextlib

    torch.set_num_threads(2)
    with open(log_path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        r = globals()[fn_name](*args)
    tmp = result_path + ".tmp"
    Path(tmp).write_text(json.dumps(r, default=str))
    Path(tmp).replace(result_path)


class Tasks:
    """Start tasks as spawned processes (or inline with parallel=False); ``wait(name)`` returns the result."""

    def __init__(self, root: Path, parallel: bool):
        import multiprocessing as mp

        self.root, self.parallel, self.ctx = root / "_tasks", parallel, mp.get_context("spawn")
        self.root.mkdir(parents=True, exist_ok=True)
        self.procs: dict = {}
        self.t_start: dict = {}

    def start(self, name: str, fn, *args) -> None:
        res, logp = str(self.root / f"{name}.json"), str(self.root / f"{name}.log")
        self.t_start[name] = time.time()
        log(f"start {name}")
        if self.parallel:
            p = self.ctx.Process(target=_entry, args=(fn.__name__, args, res, logp), name=name)
            p.start()
            self.procs[name] = p
        else:
            _entry(fn.__name__, args, res, logp)

    def wait(self, name: str):
        if name in self.procs:
            self.procs[name].join()
            if self.procs[name].exitcode != 0:
                tail = (self.root / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"task {name} failed (exit {self.procs[name].exitcode}):\n{tail}")
        r = json.loads((self.root / f"{name}.json").read_text())
        log(f"done {name} ({time.time() - self.t_start[name]:.0f} s)")
        return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default $OUT or runs/evidence)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU settings to check the script works")
    ap.add_argument("--model", default=None, help="default resnet20 (small_cnn with --quick)")
    ap.add_argument("--epochs-multi", type=int, default=None, help="default 2 (1 with --quick)")
    ap.add_argument(
        "--epochs-super",
        type=int,
        default=None,
        help="supernet epochs (default: as many as fit --deadline, at most 6; 1 with --quick)",
    )
    ap.add_argument(
        "--deadline",
        type=float,
        default=540.0,
        help="seconds the whole script may take; sizes the supernet epochs when not given (default 540)",
    )
    ap.add_argument("--configs", type=int, default=None, help="random mixed configs scored (default 16; 4 quick)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--serial", action="store_true", help="run the training runs one after another")
    ap.add_argument(
        "--with-432",
        action="store_true",
        help="also train a {4,3,2} chain (multi → sensitivity → HASB supernet) for the search evidence",
    )
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument(
        "--compiled-multi",
        action="store_true",
        help="also time the compiled 4-pass step (compiles 4 more graphs: ~2.5 extra minutes on an H100)",
    )
    a = ap.parse_args(argv)
    import os

    out = Path(a.out or os.environ.get("OUT") or "runs/evidence")
    out.mkdir(parents=True, exist_ok=True)
    quick = a.quick
    model = a.model or ("small_cnn" if quick else "resnet20")
    em = a.epochs_multi or (1 if quick else 2)
    k = a.configs or (4 if quick else 16)
    dev = torch.device(
        "cuda" if (a.device == "auto" and torch.cuda.is_available()) else ("cpu" if a.device == "auto" else a.device)
    )
    gpu = dev.type == "cuda"
    lim = dict(train_limit=1024, val_limit=500) if quick else {}
    slim = dict(train_limit=lim.get("train_limit"), val_limit=lim.get("val_limit"))
    common = dict(
        model=model,
        batch_size=a.batch_size,
        device=str(dev),
        bf16=gpu,
        progress=False,
        overwrite=True,
        augment=not quick,
        **lim,
    )
    t_all = time.time()
    res: dict = {
        "model": model,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "epochs_multi": em,
        "runs": {},
        "parallel": not a.serial,
    }
    T = Tasks(out, parallel=not a.serial)

    def cfg(**kw) -> dict:
        return TrainConfig(**{**common, **kw}).to_dict()

    # phase 1: every multi-precision-stage run at once
    T.start("multi_alrs", _task_train, cfg(stage="multi", out=str(out / "multi_alrs"), epochs=em, alrs="code"))
    T.start("multi_noalrs", _task_train, cfg(stage="multi", out=str(out / "multi_noalrs"), epochs=em, alrs="off"))
    for b in BITS:
        T.start(
            f"single_{b}",
            _task_train,
            cfg(stage="multi", out=str(out / f"single_{b}"), epochs=em, bits=[b], distill="none"),
        )
    if a.with_432:
        T.start(
            "multi_432",
            _task_train,
            cfg(stage="multi", out=str(out / "multi_432"), epochs=em, bits=[4, 3, 2], alrs="code"),
        )
    pa = out / "multi_alrs"
    res["runs"]["multi_alrs"] = T.wait("multi_alrs")
    max_hvp = 64 if quick else 256
    T.start("sens", _task_sens, str(pa / "model.pt"), str(out / "sens"), slim, max_hvp, str(dev))
    sens = T.wait("sens")
    res["sensitivity_seconds"] = sens["seconds"]
    sens_path = sens["path"]

    def super_epochs(multi: dict) -> int:
        """Supernet epochs that fit the deadline: a supernet epoch costs about one multi-precision epoch."""
        if a.epochs_super:
            return a.epochs_super
        if quick:
            return 1
        # measured while every phase-1 run shared the device; phase 2 runs three at a time (~0.8× as long, H200)
        ep_s = 0.8 * multi["seconds"] / multi["epochs"]
        left = a.deadline - (time.time() - t_all) - 90  # scoring and slack
        return int(max(1, min(6, left // ep_s)))

    es = super_epochs(res["runs"]["multi_alrs"])
    res["epochs_super"] = es
    log(f"supernet epochs: {es}")
    sup = dict(lr=2e-3 / 4, warmup_epochs=0 if es < 3 else None, epochs=es)
    T.start(
        "super_hasb",
        _task_train,
        cfg(
            stage="supernet",
            out=str(out / "super_hasb"),
            init=str(pa / "model.pt"),
            sampler="hasb" if sens_path else "uniform",
            sensitivity=sens_path,
            **sup,
        ),
    )
    T.start(
        "super_uniform",
        _task_train,
        cfg(stage="supernet", out=str(out / "super_uniform"), init=str(pa / "model.pt"), sampler="uniform", **sup),
    )
    if a.with_432:
        m3 = T.wait("multi_432")
        res["runs"]["multi_432"] = m3
        T.start(
            "sens_432", _task_sens, str(out / "multi_432" / "model.pt"), str(out / "sens_432"), slim, max_hvp, str(dev)
        )
        s3 = T.wait("sens_432")
        es3 = super_epochs(m3)
        T.start(
            "super_432",
            _task_train,
            cfg(
                stage="supernet",
                out=str(out / "super_432"),
                init=str(out / "multi_432" / "model.pt"),
                bits=[4, 3, 2],
                sampler="hasb" if s3["path"] else "uniform",
                sensitivity=s3["path"],
                **{**sup, "epochs": es3, "warmup_epochs": 0 if es3 < 3 else None},
            ),
        )
    res["runs"]["multi_noalrs"] = T.wait("multi_noalrs")
    res["runs"]["separate"] = {b: T.wait(f"single_{b}") for b in BITS}
    res["runs"]["super_hasb"] = {**T.wait("super_hasb"), "sampler": "hasb" if sens_path else "uniform"}
    res["runs"]["super_uniform"] = T.wait("super_uniform")

    log("scoring sub-nets: TBN vs BN re-calibration")
    layers = hasb.searchable_layers(load_supernet(pa))
    cost = hasb.CostModel.from_model(load_supernet(pa))
    configs = random_configs(layers, k, seed=0)
    res["subnets"] = {
        "avg_bit_equivalent": [cost.avg_bit_equivalent(c) for c in configs],
        "configs": [c.short() for c in configs],
    }
    for name, p in (("multi", pa), ("hasb", out / "super_hasb"), ("uniform", out / "super_uniform")):
        T.start(f"score_{name}", _task_score, str(p / "model.pt"), [c.to_dict() for c in configs], lim, str(dev))
    res["subnets"]["scores"] = {name: T.wait(f"score_{name}") for name in ("multi", "hasb", "uniform")}
    if a.with_432:
        r3 = T.wait("super_432")
        res["runs"]["super_432"] = r3
        res["epochs_super_432"] = r3["epochs"]
    if not a.skip_timing:  # alone on the device: nothing else runs now
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
    L = [
        f"## Training evidence: {res['model']} on Fashion-MNIST ({res['device']}); multi {res['epochs_multi']} "
        f"epochs, supernet {res['epochs_super']} epochs; total {res['total_seconds']:.0f} s",
        "",
        "| val acc % | w8a8 | w6a6 | w4a4 | w2a2 | seconds |",
        "|---|---|---|---|---|---|",
    ]

    def row(name, m, secs):
        return f"| {name} | " + " | ".join(f"{100 * m[f'acc_w{b}a{b}']:.2f}" for b in BITS) + f" | {secs:.0f} |"

    L.append(row("multi-precision, ALRS code", r["multi_alrs"], r["multi_alrs"]["seconds"]))
    L.append(row("multi-precision, ALRS off", r["multi_noalrs"], r["multi_noalrs"]["seconds"]))
    sep = r["separate"]
    L.append(
        "| separate LSQ per bit | "
        + " | ".join(f"{100 * sep[b][f'acc_w{b}a{b}']:.2f}" for b in BITS)
        + f" | {sum(s['seconds'] for s in sep.values()):.0f} |"
    )
    sn = res["subnets"]["scores"]
    for name in ("hasb", "uniform"):
        L.append(
            f"| supernet {name} sampler (TBN b-b) | "
            + " | ".join(f"{100 * sn[name]['uniform'][str(b)]:.2f}" for b in BITS)
            + f" | {r['super_' + name]['seconds']:.0f} |"
        )
    L += [
        "",
        "Random mixed configs (same configs for every model; mean val acc %, avg-bit equivalent "
        f"{min(res['subnets']['avg_bit_equivalent']):.2f}–{max(res['subnets']['avg_bit_equivalent']):.2f}):",
        "",
        "| model | TBN / per-bit BN as trained | BN re-calibrated (1024 imgs) | Spearman(TBN, recal) |",
        "|---|---|---|---|",
    ]
    for name in ("multi", "hasb", "uniform"):
        s = sn[name]
        mt, mr = sum(s["tbn"]) / len(s["tbn"]), sum(s["recal"]) / len(s["recal"])
        L.append(f"| {name} | {100 * mt:.2f} | {100 * mr:.2f} | {spearman(s['tbn'], s['recal']):.2f} |")
    dh = [h - u for h, u in zip(sn["hasb"]["recal"], sn["uniform"]["recal"], strict=False)]
    if len(dh) > 1:
        import statistics

        se = statistics.stdev(dh) / len(dh) ** 0.5
        L += [
            "",
            f"HASB − uniform sampler on the same {len(dh)} configs (BN re-calibrated): "
            f"{100 * statistics.mean(dh):+.2f} ± {100 * se:.2f} points (paired mean ± s.e.)",
        ]
    if "super_432" in r:
        m3, s3 = r["multi_432"], r["super_432"]
        L += [
            "",
            "| {4,3,2} chain (search evidence) | w4a4 | w3a3 | w2a2 | epochs | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in (("multi-precision", m3), ("HASB supernet (TBN b-b)", s3)):
            L.append(
                f"| {name} | "
                + " | ".join(f"{100 * m[f'acc_w{b}a{b}']:.2f}" for b in (4, 3, 2))
                + f" | {m['epochs']} | {m['seconds']:.0f} |"
            )
    if "step_time" in res:
        L += [
            "",
            "| step time (ResNet b256) | float ms | one w8a8 pass | ratio | 4-pass multi step | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for tag, s in res["step_time"].items():
            L.append(
                f"| {tag} | {s['float_ms']:.2f} | {s['w8a8_pass_ms']:.2f} | {s['pass_ratio']:.2f}x | "
                f"{s['multi4_ms']:.2f} | {s['multi_ratio']:.2f}x |"
            )
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
