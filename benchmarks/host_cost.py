"""Host cost per call (µs) of the eager quantizer paths on tiny CUDA tensors, where the GPU work is ~0: what an
eager quantized step pays per layer on the host (issue 15's eager targets).  Reads hasb.kernels' private launch
helpers: the bare launches are the floor under the autograd Functions.  Needs CUDA and Triton.

    python benchmarks/host_cost.py [--calls 400]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from hasb import kernels as K
from hasb import quantizer as Q


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


def cost(fn: Callable[[], object], calls: int) -> float:
    """µs per call: best of 5 batches of ``calls`` unsynchronised calls, synchronised at the end of each batch."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best.append((time.perf_counter() - t) / calls * 1e6)
    return min(best)


def rows(layers: int = 20) -> dict[str, Callable[[], object]]:
    import triton
    import triton.language as tl

    @triton.jit
    def nop(x_ptr, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)

    dev = "cuda"
    x = torch.randn(8, 16, 4, 4, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    x.requires_grad_()
    sa = torch.tensor(0.1, device=dev, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, device=dev, requires_grad=True)
    sw = torch.full((16,), 0.05, device=dev, requires_grad=True)
    go, gw, buf = torch.ones_like(x), torch.ones_like(w), torch.zeros(64, device=dev)
    ws = [(w.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()) for _ in range(layers)]

    def composite(f):
        with Q.composite_ops():
            return f()

    def no_grad(f):
        with torch.no_grad():
            return f()

    def many():
        outs = K.quantize_weights([a for a, _ in ws], [b for _, b in ws], [4] * layers, [8] * layers, "half_up")
        torch.autograd.backward(outs, [gw] * layers)

    return {
        "triton nop launch": lambda: nop[(1,)](buf, 64, BLOCK=64),
        "aten mul launch": lambda: torch.mul(buf, 2.0),
        "autograd Function.apply (identity) fwd+bwd": lambda: _Identity.apply(x, sa).backward(go),
        "x*s fwd+bwd (aten, 2 grads)": lambda: (x * sa).backward(go),
        "act: bare fwd launch": lambda: K._launch_act_forward(x.detach(), sa.detach(), 0.0, 15.0),
        "act: bare bwd launch (+sum)": lambda: K._launch_act_backward(x.detach(), sa.detach(), go, 0.0, 15.0, 0.01),
        "act: quantize_activation fwd (no grad)": lambda: no_grad(lambda: K.quantize_activation(x, sa, 4, False)),
        "act: quantize_activation fwd+bwd": lambda: K.quantize_activation(x, sa, 4, False).backward(go),
        "act: composite fwd+bwd": lambda: composite(lambda: Q.quantize_activation(x, sa, 4, False).backward(go)),
        "w: bare fwd launch": lambda: K._launch_forward(w.detach(), sw.detach(), 4, 8, "half_up"),
        "w: bare bwd launch": lambda: K._launch_backward(w.detach(), sw.detach(), gw, 4, 8, "half_up", 0.01),
        "w: quantize_weight fwd+bwd": lambda: K.quantize_weight(w, sw, 4, 8).backward(gw),
        "w: composite fwd+bwd": lambda: composite(lambda: Q.quantize_weight(w, sw, 4, 8).backward(gw)),
        f"w x{layers}: per-layer quantize_weight fwd+bwd": lambda: torch.autograd.backward(
            [K.quantize_weight(a, b, 4, 8) for a, b in ws], [gw] * layers
        ),
        f"w x{layers}: quantize_weights (one pass) fwd+bwd": many,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400, help="calls per timed batch (best of 5 batches)")
    args = ap.parse_args()
    if not K.available():
        ap.error("needs CUDA and Triton (the kernels' host cost); on this machine neither is present")
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"| path | µs per call (host-bound, best of 5 × {args.calls}) |\n|---|---|")
    for name, fn in rows().items():
        print(f"| {name} | {cost(fn, args.calls):.1f} |")


if __name__ == "__main__":
    main()
