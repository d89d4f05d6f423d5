"""The activation quantizer's forward + backward under ``torch.compile``, alone, against its memory-traffic floor
(issue 15: in the compiled W4A4 step the scale-gradient sum is the largest non-conv kernel).

One bf16 channels_last activation shaped like ResNet-18@224's largest quantized input at batch 256 (``--shape``,
default 256x64x56x56 = 51 M elements) and a random upstream gradient; each variant is compiled as one function
``(x, s, gout) -> (∂L/∂x, ∂L/∂s)`` and timed (median of ``--iters``):

- ``relu``: ReLU forward + backward, the floor (reads x and the gradient, writes ∂L/∂x);
- ``composite``: :func:`hasb.quantizer.lsq_fake_quant` (the path compiled steps take), memory-order view;
- ``composite_logical``: the same on the logical (NCHW) view (the code before session 6);
- ``one_sum``: :func:`hasb.quantizer.lsq_fake_quant_one_sum` (compiled bits-as-data graphs: one backward sum).

Measured in session 7 (benchmarks/RESULTS.md): alone, inductor reorders the logical reduction itself, so this
isolated kernel is no guide to the training step; it shows what a variant costs against the floor.

    python -m benchmarks.act_quant_reduce [--iters 20]   (TORCH_LOGS=output_code shows the kernels)
    python -m benchmarks.act_quant_reduce --device cpu --backend aot_eager --shape 2,4,6,6 --iters 1  (smoke)

GB/s counts the bytes every variant must move: read x, read ∂L/∂y, write ∂L/∂x (forward output: + write y).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hasb import quantizer as Q


def variants():
    def relu(x, s, gout):
        y = torch.relu(x)
        return torch.autograd.grad(y, (x,), gout)[0], s

    def composite(x, s, gout, order=True):
        g, qn, qp = 1.0 / (x.numel() * 15) ** 0.5, 0.0, 15.0
        y = Q.lsq_fake_quant(x, s, g, qn, qp) if order else _logical(x, s, g, qn, qp)
        return torch.autograd.grad(y, (x, s), gout)

    def one_sum(x, s, gout):
        c = [torch.tensor(v, device=x.device) for v in (1.0 / (x.numel() * 15) ** 0.5, 0.0, 15.0)]
        y = Q.lsq_fake_quant_one_sum(x, s, *c)
        return torch.autograd.grad(y, (x, s), gout)

    return {
        "relu": relu,
        "composite": composite,
        "composite_logical": lambda x, s, g: composite(x, s, g, order=False),
        "one_sum": one_sum,
    }


def _logical(x, s, g, qn, qp):
    sg = Q.grad_scale(s, g)
    q = torch.clamp(x / sg, qn, qp)
    return (q + (torch.round(q) - q).detach()) * sg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="256,64,56,56", help="N,C,H,W of the bf16 channels_last activation")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick smoke run)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    shape = [int(v) for v in args.shape.split(",")]
    x = torch.randn(shape, device=dev).relu().to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    s = torch.tensor(0.1, device=dev, requires_grad=True)
    gout = torch.randn_like(x)
    moved = 3 * x.numel() * x.element_size()
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, x {tuple(shape)} bf16 channels_last")
    print("| variant | ms | GB/s of 3 passes | ∂L/∂s |")
    print("|---|---|---|---|")
    for name, fn in variants().items():
        f = torch.compile(fn, backend=args.backend)
        for _ in range(3):
            gx, gs = f(x, s, gout)
        sync()
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            f(x, s, gout)
            sync()
            times.append(time.perf_counter() - t)
        ms = 1000 * statistics.median(times)
        print(f"| {name} | {ms:.3f} | {moved / ms / 1e6:.0f} | {float(gs):.4g} |", flush=True)


if __name__ == "__main__":
    main()
