"""The activation quantizer's forward + backward under ``torch.compile``, alone, against its memory-traffic floor
(issue 15: in the compiled W4A4 step the scale-gradient sum is the largest non-conv kernel).

One bf16 channels_last activation shaped like ResNet-18@224's largest quantized input at batch 256 (``--shape``,
default 256x64x56x56 = 51 M elements) and a random upstream gradient; each variant is compiled as one function
``(x, s, gout) -> (∂L/∂x, ∂L/∂s)`` and timed (median of ``--iters``):

- ``relu``: ReLU forward + backward, the floor (reads x and the gradient, writes ∂L/∂x);
- ``composite``: :func:`hasb.quantizer.lsq_fake_quant` (the path compiled steps take), memory-order view;
- ``composite_logical``: the same on the logical (NCHW) view (the code before session 6);
- ``function``: the same math as one autograd.Function whose backward writes ∂L/∂s as one sum of one term;
- ``function_rows``: that sum split by hand into rows of 8192 elements, then the row sums.

    python -m benchmarks.act_quant_reduce [--iters 20]   (CUDA only; TORCH_LOGS=output_code shows the kernels)

GB/s counts the bytes every variant must move: read x, read ∂L/∂y, write ∂L/∂x (forward output: + write y).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hasb import quantizer as Q


class _LSQ(torch.autograd.Function):
    """round(clip(x/s)) · s, STE for x, LSQ for s (the composite's values and gradients up to the sum's order)."""

    @staticmethod
    def forward(ctx, x, s, g, qn, qp, rows):
        q = torch.clamp(x / s, qn, qp)
        ctx.save_for_backward(x, s, g, qn, qp)
        ctx.rows = rows
        return torch.round(q) * s

    @staticmethod
    def backward(ctx, gout):
        x, s, g, qn, qp = ctx.saved_tensors
        q = x / s
        inside = (q >= qn) & (q <= qp)
        inner = torch.where(inside, torch.round(q) - q, torch.clamp(q, qn, qp)).float() * gout.float()
        if ctx.rows:
            inner = inner.reshape(-1, ctx.rows).sum(1)
        gs = inner.sum() * g
        return gout * inside, gs.to(s.dtype), None, None, None, None


def variants():
    def relu(x, s, gout):
        y = torch.relu(x)
        return torch.autograd.grad(y, (x,), gout)[0], s

    def composite(x, s, gout, order=True):
        g, qn, qp = 1.0 / (x.numel() * 15) ** 0.5, 0.0, 15.0
        y = Q.lsq_fake_quant(x, s, g, qn, qp) if order else _logical(x, s, g, qn, qp)
        return torch.autograd.grad(y, (x, s), gout)

    def function(x, s, gout, rows=0):
        c = [torch.tensor(v, device=x.device) for v in (1.0 / (x.numel() * 15) ** 0.5, 0.0, 15.0)]
        y = _LSQ.apply(x, s, *c, rows)
        return torch.autograd.grad(y, (x, s), gout)

    return {
        "relu": relu,
        "composite": composite,
        "composite_logical": lambda x, s, g: composite(x, s, g, order=False),
        "function": function,
        "function_rows": lambda x, s, g: function(x, s, g, rows=8192),
    }


def _logical(x, s, g, qn, qp):
    sg = Q.grad_scale(s, g)
    q = torch.clamp(x / sg, qn, qp)
    return (q + (torch.round(q) - q).detach()) * sg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="256,64,56,56", help="N,C,H,W of the bf16 channels_last activation")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    shape = [int(v) for v in args.shape.split(",")]
    x = torch.randn(shape, device=dev).relu().to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    s = torch.tensor(0.1, device=dev, requires_grad=True)
    gout = torch.randn_like(x)
    moved = 3 * x.numel() * x.element_size()
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, x {tuple(shape)} bf16 channels_last")
    print("| variant | ms | GB/s of 3 passes | ∂L/∂s |")
    print("|---|---|---|---|")
    for name, fn in variants().items():
        f = torch.compile(fn)
        for _ in range(3):
            gx, gs = f(x, s, gout)
        torch.cuda.synchronize()
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            f(x, s, gout)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        ms = 1000 * statistics.median(times)
        print(f"| {name} | {ms:.3f} | {moved / ms / 1e6:.0f} | {float(gs):.4g} |", flush=True)


if __name__ == "__main__":
    main()
