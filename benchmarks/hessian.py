"""HVP cost and trace-estimator efficiency: prints two tables (not a test; numbers go to benchmarks/RESULTS.md).

1. Cost per probe ÷ one gradient (forward + backward) for each HVP path, on each model:
   - double_backward: our engine, one create_graph backward per batch reused by a block of --probes probes
   - func: vmap over --probes of jvp(grad) (forward-over-reverse)
   - recompute: PyHessian dataloader style, fwd + create_graph bwd + one grad for every probe
   - pyhessian: PyHessian 0.1 itself (single-batch mode, graph at init), when importable
   plus peak memory per path on CUDA.
2. HVPs needed for 5% relative SE (--rtol) on every layer whose |trace| ≥ 1% (--floor) of the largest:
   full-model Hutchinson vs layer-restricted (the default, ``analysis.trace.DEFAULT_ESTIMATOR = "layer"``,
   chosen by this table) vs Hutch++ deflation per block (``hutchpp``).  Each estimator runs
   adaptively up to --max-hvp; the projected count extrapolates from its per-layer sample variances
   (full: max_l need_l probes; restricted: Σ_l min(need_l, n_l) with the exact switch; hutchpp adds 2·sketch).
3. The exact estimator (analysis.exact, per-sample backward passes, all layers at once) on each model of
   --models: wall time ÷ one gradient of the same batch (measured gradient-equivalents, forwards included),
   per-sample VJPs ÷ batch (counted), and whether every layer's trace is the Hessian's (piecewise linear).

CPU default:   python benchmarks/hessian.py
H100:          python benchmarks/hessian.py --device cuda --models resnet18,resnet50,mobilenet_v2 \\
                   --image-size 224 --in-channels 3 --batch 64 --probes 8 --count-model resnet20 --count-image-size 28
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.exact import exact_layer_traces  # noqa: E402
from analysis.hvp import HessianOperator, rademacher  # noqa: E402
from analysis.trace import estimate_traces  # noqa: E402
from hasb.models import build_model  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, reps):
    ts, peak = [], 0
    for r in range(reps + 1):  # first call is a warm-up
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        if r:
            ts.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
    return statistics.median(ts), peak / 2**30


def cost_table(args, dev) -> list[dict]:
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, in_channels=args.in_channels, image_size=args.image_size).to(dev).eval()
        x = torch.randn(args.batch, args.in_channels, args.image_size, args.image_size, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)
        P = args.probes
        g = torch.Generator().manual_seed(0)
        res = {"model": name, "batch": args.batch, "probes": P}
        op = HessianOperator(model, [(x, y)], backend="double_backward", cache_graphs=False, max_block=P)
        V = [rademacher((P, *s), g, op.dtype, dev) for s in op.shapes]
        t_grad, m_grad = _timed(op.gradient, dev, args.reps)
        res["grad_ms"], res["grad_GiB"] = t_grad * 1e3, m_grad

        def db(op=op, V=V):
            op.hvp(V)

        t, m = _timed(db, dev, args.reps)
        res["double_backward"], res["double_backward_GiB"] = t / P / t_grad, m

        def recompute(op=op, V=V, P=P):
            for j in range(P):
                op.hvp([v[j : j + 1] for v in V])

        t, m = _timed(recompute, dev, args.reps)
        res["recompute"], res["recompute_GiB"] = t / P / t_grad, m
        try:
            fop = HessianOperator(model, [(x, y)], backend="func", max_block=P)
            t, m = _timed(lambda fop=fop, V=V: fop.hvp(V), dev, args.reps)
            res["func"], res["func_GiB"] = t / P / t_grad, m
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            res["func"], res["func_GiB"] = float("nan"), float("nan")
            print(f"  func backend failed on {name}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        try:
            import pyhessian

            def ph(model=model, x=x, y=y, P=P):
                h = pyhessian.hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=dev.type == "cuda")
                h.trace(maxIter=P, tol=0.0)
                model.zero_grad(set_to_none=True)

            t, m = _timed(ph, dev, args.reps)
            res["pyhessian"], res["pyhessian_GiB"] = t / P / t_grad, m
        except ImportError:
            res["pyhessian"] = res["pyhessian_GiB"] = float("nan")
        rows.append(res)
        del op
    return rows


def _projection(r, qualify, rtol, sketch) -> int:
    n = np.asarray(r.n_params)
    samples = np.maximum(r.n_hvp - (2 * np.minimum(sketch, n) if r.estimator == "hutchpp" else 0), 1)
    sd = r.stderr * np.sqrt(samples)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.ceil((sd / (rtol * np.abs(r.trace))) ** 2)
    need = np.where(qualify & ~r.exact, np.maximum(need, 8), 8)
    need = np.where(r.exact, n, need)
    if r.estimator == "full":
        return int(need[qualify].max())
    need = np.minimum(need, n)  # the exact switch caps a layer at n_l HVPs
    extra = 2 * np.minimum(sketch, n) if r.estimator == "hutchpp" else 0
    return int((need + extra).sum())


def count_table(args, dev) -> list[dict]:
    from hasb.data import batches, load_dataset

    splits = load_dataset("fashion-mnist", train_limit=args.pretrain_steps * 128 + 128)
    torch.manual_seed(0)
    model = build_model(args.count_model).to(dev)
    if args.pretrain_steps:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        it = batches(splits.train, 128, shuffle=True, generator=torch.Generator().manual_seed(0), device=dev)
        for _, (xb, yb) in zip(range(args.pretrain_steps), it, strict=False):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    x, y = splits.calib
    data = [(x[: args.count_batch].to(dev), y[: args.count_batch].to(dev))]
    op = HessianOperator(model, data, backend=args.backend)
    rows = []
    for est in ("full", "layer", "hutchpp"):
        t0 = time.perf_counter()
        r = estimate_traces(
            op, est, rtol=args.rtol, max_hvp=args.max_hvp, floor=args.floor, seed=0, sketch=args.sketch, block=8
        )
        qualify = np.abs(r.trace) >= args.floor * np.abs(r.trace).max()
        rows.append(
            {
                "estimator": est,
                "spent": r.total_hvp,
                "converged": bool(r.converged.all()),
                "projected": _projection(r, qualify, args.rtol, args.sketch),
                "layers": int(qualify.sum()),
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


def exact_table(args, dev) -> list[dict]:
    """Exact per-layer traces of every Conv2d/Linear on one batch of --batch random images (10 classes)."""
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, in_channels=args.in_channels, image_size=args.image_size).to(dev).eval()
        x = torch.randn(args.batch, args.in_channels, args.image_size, args.image_size, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)
        op = HessianOperator(model, [(x, y)], backend="double_backward", cache_graphs=False)
        t_grad, _ = _timed(op.gradient, dev, args.reps)
        out = {}

        def run(model=model, x=x, y=y, out=out):
            out["r"] = exact_layer_traces(model, [(x, y)], chunk=args.exact_chunk)

        t, m = _timed(run, dev, args.reps)
        r = out["r"]
        rows.append(
            {
                "model": name,
                "batch": args.batch,
                "layers": len(r.names),
                "grad_ms": t_grad * 1e3,
                "exact_s": t,
                "measured": t / t_grad,
                "counted": r.grad_equiv,
                "GiB": m,
                "hessian": bool(r.hessian_exact.all()),
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20", help="comma-separated zoo models for the cost table")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--probes", type=int, default=4, help="probes per block (vmap width / graph reuse)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions after one warm-up (median)")
    p.add_argument("--count-model", default="resnet20", help="model of the HVP-count table ('' skips it)")
    p.add_argument("--count-batch", type=int, default=128, help="calibration images for the count table")
    p.add_argument("--pretrain-steps", type=int, default=100, help="SGD steps on Fashion-MNIST before counting")
    p.add_argument("--rtol", type=float, default=0.05)
    p.add_argument("--floor", type=float, default=0.01)
    p.add_argument("--sketch", type=int, default=16)
    p.add_argument("--max-hvp", type=int, default=2000)
    p.add_argument("--backend", default="auto", help="HVP backend of the count table")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-exact", action="store_true", help="skip the exact-estimator table")
    p.add_argument("--exact-chunk", type=int, default=64, help="per-sample backward passes per vmap call")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    print(
        f"torch {torch.__version__}, device {dev}"
        f"{' (' + torch.cuda.get_device_name() + ')' if dev.type == 'cuda' else f', {torch.get_num_threads()} threads'}"
    )
    if not a.skip_cost:
        rows = cost_table(a, dev)
        print("\nHVP cost per probe ÷ one gradient (lower is better); peak GiB on CUDA")
        print(
            f"{'model':14s} {'batch':>5s} {'grad ms':>8s} {'dbl-bwd':>8s} {'func':>8s} {'recomp':>8s} {'pyhess':>8s}"
            f" {'GiB g/db/func/rec/ph':>26s}"
        )
        for r in rows:
            mem = "/".join(
                f"{r.get(k, float('nan')):.2f}"
                for k in ("grad_GiB", "double_backward_GiB", "func_GiB", "recompute_GiB", "pyhessian_GiB")
            )
            print(
                f"{r['model']:14s} {r['batch']:5d} {r['grad_ms']:8.1f} {r['double_backward']:8.2f} {r['func']:8.2f} "
                f"{r['recompute']:8.2f} {r['pyhessian']:8.2f} {mem:>26s}"
            )
    if not a.skip_exact:
        rows = exact_table(a, dev)
        print(
            "\nExact per-layer traces (analysis.exact, all 10 class columns, all Conv2d/Linear layers), one batch of "
            "random images; gradient-equivalents = time ÷ one gradient of that batch (counted: per-sample VJPs ÷ batch)"
        )
        print(
            f"{'model':14s} {'batch':>5s} {'layers':>6s} {'grad ms':>8s} {'exact s':>8s} {'measured':>9s} "
            f"{'counted':>8s} {'GiB':>6s} {'= Hessian':>9s}"
        )
        for r in rows:
            print(
                f"{r['model']:14s} {r['batch']:5d} {r['layers']:6d} {r['grad_ms']:8.1f} {r['exact_s']:8.2f} "
                f"{r['measured']:9.1f} {r['counted']:8.1f} {r['GiB']:6.2f} {str(r['hessian']):>9s}"
            )
    if a.count_model:
        rows = count_table(a, dev)
        print(
            f"\nHVPs for {a.rtol:.0%} relative SE on every layer with |trace| ≥ {a.floor:.0%} of the largest "
            f"({a.count_model}, {a.count_batch} images, {a.pretrain_steps} SGD steps)"
        )
        print(f"{'estimator':10s} {'spent':>7s} {'converged':>9s} {'projected':>10s} {'layers':>6s} {'sec':>7s}")
        for r in rows:
            print(
                f"{r['estimator']:10s} {r['spent']:7d} {str(r['converged']):>9s} {r['projected']:10d} "
                f"{r['layers']:6d} {r['seconds']:7.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
