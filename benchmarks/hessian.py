"""HVP cost and trace-estimator efficiency: prints three tables (not a test; numbers go to benchmarks/RESULTS.md).

1. Cost per probe ÷ one gradient (forward + backward) for each HVP path (--columns picks them), per model:
   - double_backward: our engine, one create_graph backward per batch reused by a block of --probes probes
   - func: vmap over --probes of jvp(grad) (forward-over-reverse)
   - recompute: PyHessian dataloader style, fwd + create_graph bwd + one grad for every probe
   - ggn_block: layer-restricted products H_ll v = J_lᵀ ∇²L J_l v (analysis.ggn; exact on piecewise-linear
     nets, NaN otherwise), every layer's --probes probes in one call, time ÷ (layers × probes)
   - pyhessian: PyHessian 0.1 itself (single-batch mode, graph at init), when importable
   plus peak memory per path on CUDA.  Rows print as each model finishes; progress goes to stderr.
2. The exact estimator (analysis.exact, per-sample backward passes, all layers at once) on each model of
   --models, --batch images in micro-batches of --micro-batch: wall time ÷ one gradient of the same images
   (measured gradient-equivalents, forwards included), per-sample VJPs ÷ batch (counted), and whether every
   layer's trace is the Hessian's (piecewise linear).
3. HVPs needed for 5% relative SE (--rtol) on every layer whose |trace| ≥ 1% (--floor) of the largest
   (--count-model, 'none' skips it): full-model Hutchinson vs layer-restricted vs Hutch++ deflation per block.
   Each estimator runs adaptively up to --max-hvp; the projected count extrapolates from its per-layer
   sample variances (full: max_l need_l probes; restricted: Σ_l min(need_l, n_l) with the exact switch;
   hutchpp adds 2·sketch).

CPU default:   python -m benchmarks.hessian --models resnet20 --batch 128 --count-model none
GPU, one model per call (each ≤ 3 min):
    python -m benchmarks.hessian --models resnet18 --image-size 224 --in-channels 3 --batch 64 --device cuda \\
        --skip-exact --count-model none
    python -m benchmarks.hessian --skip-cost --models resnet18 --image-size 224 --in-channels 3 --batch 1024 \\
        --device cuda --count-model none
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
from analysis.hvp import HessianOperator, HVPError, rademacher  # noqa: E402
from analysis.trace import estimate_traces  # noqa: E402
from hasb.models import build_model  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, reps, warm=True):
    """(median seconds of ``reps`` calls, peak GiB above the start on CUDA); first an untimed warm-up call."""
    ts, peak = [], 0
    for r in range(0 if warm else 1, reps + 1):  # r = 0: the warm-up
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


COLUMNS = ("double_backward", "func", "recompute", "ggn_block", "pyhessian")


def _log(msg: str) -> None:
    """Progress on stderr, flushed (a long run shows where it is)."""
    print(msg, file=sys.stderr, flush=True)


def _random_batch(args, dev, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, args.in_channels, args.image_size, args.image_size, device=dev)
    return x, torch.randint(0, 10, (n,), device=dev)


def _pyhessian_fn(model, x, y, P, dev):
    import pyhessian

    def ph():
        h = pyhessian.hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=dev.type == "cuda")
        h.trace(maxIter=P, tol=0.0)
        model.zero_grad(set_to_none=True)

    return ph


def _column_fn(col: str, model, data, V, P: int, dev):
    """(the call to time, HVPs per call) of one cost-table column; HVPError / ImportError if unavailable."""
    x, y = data[0]
    if col == "pyhessian":
        return _pyhessian_fn(model, x, y, P, dev), P
    if col == "ggn_block":  # every layer's restricted probes in one call: L·P products (warmed up on 1 per layer)
        gop = HessianOperator(model, data, backend="ggn_block", max_block=P, cache_graphs=False)
        gop.block_hvp({l: v[:1] for l, v in enumerate(V)})
        Vb = dict(enumerate(V))
        return (lambda: gop.block_hvp(Vb)), P * len(V)
    backend = "func" if col == "func" else "double_backward"
    op = HessianOperator(model, data, backend=backend, max_block=P, cache_graphs=False)
    if col == "recompute":  # PyHessian's dataloader style: the graph rebuilt for every probe
        return (lambda: [op.hvp([v[j : j + 1] for v in V]) for j in range(P)]), P
    return (lambda: op.hvp(V)), P


def cost_row(name: str, args, dev, columns: list[str]) -> dict:
    """One model's row: gradient time, then per column the seconds per HVP ÷ one gradient and peak GiB.

    The divisor is the faster of the first gradient timing and one taken right after the column (the load of
    a shared machine drifts between columns; the faster one is the closer to the unloaded cost)."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=args.in_channels, image_size=args.image_size).to(dev).eval()
    data = [_random_batch(args, dev, args.batch)]
    P, t0 = args.probes, time.perf_counter()
    op = HessianOperator(model, data, backend="double_backward", cache_graphs=False)
    g = torch.Generator().manual_seed(0)
    V = [rademacher((P, *s), g, op.dtype, dev) for s in op.shapes]
    t_grad, m_grad = _timed(op.gradient, dev, args.reps)
    res = {"model": name, "grad_ms": t_grad * 1e3, "grad_GiB": m_grad, "dtype": str(op.dtype).split(".")[-1]}
    _log(f"[{name}] gradient {t_grad * 1e3:.1f} ms ({time.perf_counter() - t0:.1f} s with setup)")
    for col in columns:
        t0 = time.perf_counter()
        try:
            fn, n = _column_fn(col, model, data, V, P, dev)
            ggn = col == "ggn_block"  # one call is already an average over L·P products, and L times longer
            t, m = _timed(fn, dev, 1 if ggn else args.reps, warm=not ggn)
            t_g, _ = _timed(op.gradient, dev, args.reps, warm=False)  # paired: a shared machine's load drifts
            res[col], res[f"{col}_GiB"] = t / n / min(t_g, t_grad), m
        except (RuntimeError, ImportError, HVPError) as e:  # missing forward AD, not piecewise linear, no pyhessian
            res[col] = res[f"{col}_GiB"] = float("nan")
            _log(f"[{name}] {col} unavailable: {str(e).splitlines()[0][:150]}")
        _log(f"[{name}] {col}: {res[col]:.2f} gradients per HVP ({time.perf_counter() - t0:.1f} s)")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return res


def print_cost_table(args, dev, columns: list[str]) -> None:
    """The cost table, one row per model printed as soon as it is measured."""
    print(
        f"\nHVP cost per probe ÷ one gradient (lower is better), batch {args.batch}, "
        f"{args.in_channels}×{args.image_size}×{args.image_size} random images, {args.probes} probes per block, "
        f"median of {args.reps} after a warm-up; ggn_block: layer-restricted products, averaged over layers; "
        f"peak GiB on CUDA"
    )
    print(f"{'model':14s} {'dtype':>8s} {'grad ms':>8s} " + " ".join(f"{c[:9]:>9s}" for c in columns) + "  GiB grad/…")
    for name in args.models.split(","):
        r = cost_row(name, args, dev, columns)
        mem = "/".join(f"{r.get(f'{k}_GiB', float('nan')):.2f}" for k in ["grad", *columns])
        cells = " ".join(f"{r[c]:9.2f}" for c in columns)
        print(f"{r['model']:14s} {r['dtype']:>8s} {r['grad_ms']:8.1f} {cells}  {mem}", flush=True)


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


def exact_row(name: str, args, dev) -> dict:
    """Exact per-layer traces of every Conv2d/Linear of ``name`` on --batch random images (10 classes), in
    micro-batches of --micro-batch (memory); timed once after a warm-up on the first micro-batch."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=args.in_channels, image_size=args.image_size).to(dev).eval()
    x, y = _random_batch(args, dev, args.batch)
    mb = args.micro_batch or args.batch
    data = [(x[s : s + mb], y[s : s + mb]) for s in range(0, args.batch, mb)]
    op = HessianOperator(model, data, backend="double_backward", cache_graphs=False)
    t_grad, _ = _timed(op.gradient, dev, args.reps)
    _log(f"[{name}] exact table: gradient of {args.batch} images {t_grad:.2f} s")
    exact_layer_traces(model, data[:1], chunk=args.exact_chunk)  # warm-up (kernels, allocator)
    out = {}
    t, m = _timed(lambda: out.update(r=exact_layer_traces(model, data, chunk=args.exact_chunk)), dev, 1, warm=False)
    r = out["r"]
    _log(f"[{name}] exact traces {t:.1f} s")
    return {
        "model": name,
        "dtype": str(op.dtype).split(".")[-1],
        "layers": len(r.names),
        "grad_ms": t_grad * 1e3,
        "exact_s": t,
        "measured": t / t_grad,
        "counted": r.grad_equiv,
        "GiB": m,
        "hessian": bool(r.hessian_exact.all()),
    }


def print_exact_table(args, dev) -> None:
    print(
        f"\nExact per-layer traces (analysis.exact, all 10 class columns, all Conv2d/Linear layers), batch "
        f"{args.batch} in micro-batches of {args.micro_batch or args.batch}, {args.in_channels}×{args.image_size}"
        f"×{args.image_size} random images; measured = time ÷ one gradient of the batch (counted: VJPs ÷ batch)"
    )
    print(
        f"{'model':14s} {'dtype':>8s} {'layers':>6s} {'grad ms':>8s} {'exact s':>8s} {'measured':>9s} "
        f"{'counted':>8s} {'GiB':>6s} {'= Hessian':>9s}"
    )
    for name in args.models.split(","):
        r = exact_row(name, args, dev)
        print(
            f"{r['model']:14s} {r['dtype']:>8s} {r['layers']:6d} {r['grad_ms']:8.1f} {r['exact_s']:8.2f} "
            f"{r['measured']:9.1f} {r['counted']:8.1f} {r['GiB']:6.2f} {str(r['hessian']):>9s}",
            flush=True,
        )


def print_count_table(args, dev) -> None:
    rows = count_table(args, dev)
    print(
        f"\nHVPs for {args.rtol:.0%} relative SE on every layer with |trace| ≥ {args.floor:.0%} of the largest "
        f"({args.count_model}, {args.count_batch} Fashion-MNIST images at 28 px, {args.pretrain_steps} SGD steps)"
    )
    print(f"{'estimator':10s} {'spent':>7s} {'converged':>9s} {'projected':>10s} {'layers':>6s} {'sec':>7s}")
    for r in rows:
        print(
            f"{r['estimator']:10s} {r['spent']:7d} {str(r['converged']):>9s} {r['projected']:10d} "
            f"{r['layers']:6d} {r['seconds']:7.1f}"
        )


def parse_columns(text: str) -> list[str]:
    cols = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cols if c not in COLUMNS]
    if bad or not cols:
        raise SystemExit(f"error: unknown --columns {bad or text!r}; accepted: {', '.join(COLUMNS)}")
    return cols


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20", help="comma-separated zoo models for the cost and exact tables")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--probes", type=int, default=4, help="probes per block (vmap width / graph reuse)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions after one warm-up (median)")
    p.add_argument("--columns", default=",".join(COLUMNS), help=f"cost-table columns, from {','.join(COLUMNS)}")
    p.add_argument("--count-model", default="resnet20", help="model of the HVP-count table ('none' or '' skips it)")
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
    p.add_argument("--micro-batch", type=int, default=128, help="exact table: images per pass (0: the whole batch)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    columns = parse_columns(a.columns)
    dev = torch.device(a.device)
    print(
        f"torch {torch.__version__}, device {dev}"
        f"{' (' + torch.cuda.get_device_name() + ')' if dev.type == 'cuda' else f', {torch.get_num_threads()} threads'}",
        flush=True,
    )
    if not a.skip_cost:
        print_cost_table(a, dev, columns)
    if not a.skip_exact:
        print_exact_table(a, dev)
    if a.count_model.strip("'\" ").lower() not in ("", "none"):  # a quoted '' from a shell variable too
        print_count_table(a, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
