"""Activation-sized tensors that a compiled W4A4 backward receives in a permuted layout (issue 15, session 10).

Why: until session 10 the activation quantizer computed on a 4-D NHWC *view* of a channels_last activation (so
that its scale-gradient sum ran in memory order).  Inductor's layout optimisation gives every 4-D intermediate of a
conv graph the channels_last strides of its logical dims; for the NHWC view that is a transpose (H fastest), and
the backward then gathered the saved x / s at about 1/20 of the H200's bandwidth.  hasb now uses a 1-D view.
This compiles one training step (forward and backward) with inductor for each of the two views and counts the
backward's 4-D inputs shaped (N, H, W, C): a permuted activation.  Identified by shape, so it needs square
activations (H == W) with C != H, as in image CNNs.  The CPU (inductor's C++ backend) applies the same layout
optimisation (always, with oneDNN), so the count needs no GPU.

    python -m benchmarks.saved_layout --models resnet18@32:b4,mobilenet_v2@32:b4 --mode int
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import re
import time

import torch

import hasb
from benchmarks.quant_overhead import make, parse_model
from hasb import quantizer as Q

_SAVED = re.compile(r"assert_size_stride\((\w+), \(([\d, ]+)\), \(([\d, ]+)\), 'input'\)")


def view_4d(x: torch.Tensor):
    """Session 8's memory-order view (the baseline): 4-D, its logical order the memory order of ``x``."""
    perm = sorted(range(x.dim()), key=lambda d: -x.stride()[d])
    view = x.permute(perm)
    if perm == list(range(x.dim())) or not view.is_contiguous():
        return x, lambda y: y
    back = [perm.index(d) for d in range(x.dim())]
    return view, lambda y: y.permute(back)


@contextlib.contextmanager
def memory_view(fn):
    real = Q.memory_order
    Q.memory_order = fn
    try:
        yield
    finally:
        Q.memory_order = real


def permuted_saved(code: str) -> list[tuple[str, tuple[int, ...]]]:
    """The backward's 4-D inputs shaped (N, H, W, C) with H == W != C, from inductor's generated ``code``."""
    out = []
    for name, size, _ in _SAVED.findall(code):
        s = tuple(int(v) for v in size.split(",") if v.strip())
        if len(s) == 4 and s[1] == s[2] != s[3]:
            out.append((name, s))
    return out


def count(spec: str, mode: str, view) -> tuple[int, float]:
    """(permuted activation-sized inputs of the compiled backward, seconds to compile) for one model."""
    from torch._inductor.utils import run_and_get_code

    name, size, batch = parse_model(spec)
    fmodel, x, y, loss_fn = make(name, size, batch, torch.device("cpu"))
    qmodel = hasb.quantize_model(copy.deepcopy(fmodel), bits=(8, 6, 4, 2), example_input=x[:2])
    hasb.init_quantizers(qmodel, x[:2])
    if mode == "data":
        qmodel = hasb.bits_as_data(qmodel)
    hasb.set_config(qmodel, 4)
    torch._dynamo.reset()
    run = torch.compile(qmodel)
    t = time.perf_counter()
    with memory_view(view):
        _, codes = run_and_get_code(lambda: loss_fn(run(x), y).backward())
    torch._dynamo.reset()
    return len(permuted_saved(codes[-1])), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18@32:b4,mobilenet_v2@32:b4", help="comma-separated name@size:bB")
    ap.add_argument("--mode", default="int", choices=("int", "data"), help="int bits or bits as data")
    args = ap.parse_args()
    specs = args.models.split(",")
    for spec in specs:
        try:
            parse_model(spec)
        except ValueError:
            ap.error(f"--models {spec!r}: expected name@size:bBATCH, e.g. resnet18@32:b4")
    print(f"CPU inductor, W4A4 {args.mode}; permuted activations the compiled backward receives")
    print("| model | 4-D view (session 8) | 1-D view (hasb) | compile s (4-D / 1-D) |\n|---|---|---|---|")
    for spec in specs:
        (old, t_old), (new, t_new) = count(spec, args.mode, view_4d), count(spec, args.mode, Q.memory_order)
        print(f"| {spec} | {old} | {new} | {t_old:.0f} / {t_new:.0f} |", flush=True)


if __name__ == "__main__":
    main()
