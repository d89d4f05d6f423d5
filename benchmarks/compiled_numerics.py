"""How far compiled quantizers are from the eager composite, value by value (issue 15: "outputs and gradients equal
to the composite path").

Each case is compiled as one function and run once against the same function eager, in float32, on the same
inputs; the table counts the entries that differ, the largest difference in units of the quantization step, and
the entries whose integer code (round(value / step)) differs:

- ``act random``: per-tensor LSQ activation (:func:`hasb.quantizer.lsq_fake_quant`), 4 bits, ``--n`` normal values;
- ``act ties``: the same at values (k + ½)·s, where x / s must round exactly (Triton's approximate division may not);
- ``act ties, ATen op``: ATen's learnable fake-quant op (eager, not compiled), on those ties: the eager path on the
  CPU and wherever hasb's activation kernel does not apply;
- ``act ties, hasb eager``: :func:`hasb.kernels.quantize_activation` eager on those ties (its CUDA kernel on a GPU);
- ``weight bit l``: one layer's weight composite (:func:`hasb.quantizer.quantize_weight`), 512×512, h = 8, ∂W too;
- ``pass op bit l``: the same weight through :func:`hasb.kernels.quantize_weights_traced` (the op compiled passes
  take; its kernels on CUDA, the composite on the CPU).  Its ∂W is ∂L/∂Ŵ inside the clip range exactly, where the
  composite's autograd multiplies by the step and divides by it again: those entries differ in the last bits.

Inductor's rounding of float32 division is a config (``TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1`` exact); set it
in the environment to compare.  Measured in session 19 (benchmarks/RESULTS.md).

    python -m benchmarks.compiled_numerics                                   # CUDA, inductor
    python -m benchmarks.compiled_numerics --device cpu --n 4096 --backend aot_eager   (smoke)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hasb import kernels as K
from hasb import quantizer as Q


@dataclass
class Case:
    """``fn(*inputs)`` (compiled unless ``eager``) against ``ref(*inputs)`` eager; ``step``: the quantization step
    each output value is a multiple of (broadcasts against the output)."""

    fn: Callable
    ref: Callable
    inputs: tuple[torch.Tensor, ...]
    step: torch.Tensor
    eager: bool = False


def cases(n: int, dev: torch.device) -> dict[str, Case]:
    """{name: case} on seeded inputs (see the module docstring)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    s = torch.tensor(0.0371, device=dev)
    qn, qp = Q.int_range(4, True)
    g = Q.lsq_g(n, qp)

    def act(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return Q.lsq_fake_quant(x, s, g, qn, qp)

    def aten(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s1 = s.reshape(1)
        return torch._fake_quantize_learnable_per_tensor_affine(x, s1, torch.zeros_like(s1), qn, qp, g)

    def hasb_eager(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # its CUDA kernel where it applies
        return K.quantize_activation(x, s, 4, True)

    ties = (torch.randint(qn, qp, (n,), device=dev, generator=gen).float() + 0.5) * s
    out = {
        "act random": Case(act, act, (torch.randn(n, device=dev, generator=gen), s), s),
        "act ties": Case(act, act, (ties, s), s),
        "act ties, ATen op": Case(aten, act, (ties, s), s, eager=True),
        "act ties, hasb eager": Case(hasb_eager, act, (ties, s), s, eager=True),
    }
    w = torch.randn(512, 512, device=dev, generator=gen) * 0.05
    scale = w.abs().amax(1) / 127
    for bit in (8, 4, 2):
        step = (scale * 2.0 ** (8 - bit))[:, None]
        out[f"weight bit {bit}"] = Case(_weight(bit), _weight(bit), (w, scale), step)
        out[f"pass op bit {bit}"] = Case(_pass_op(bit), _weight(bit), (w, scale), step)
    return out


def _weight(bit: int) -> Callable:
    def f(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        with Q.composite_ops():  # the composite, also eager (not the eager kernels)
            return Q.quantize_weight(w, scale, bit, 8, "half_up")

    return f


def _pass_op(bit: int) -> Callable:
    return lambda w, scale: K.quantize_weights_traced([w], [scale], [bit], [8], "half_up")[0]


def compare(case: Case, backend: str) -> dict[str, int | float]:
    """The counts of the module docstring for one case, and the entries of the first input's gradient that differ
    (one seeded random upstream gradient)."""
    ref_in = [t.detach().clone().requires_grad_() for t in case.inputs]
    out_in = [t.detach().clone().requires_grad_() for t in case.inputs]
    ref = case.ref(*ref_in)
    torch._dynamo.reset()
    out = (case.fn if case.eager else torch.compile(case.fn, backend=backend))(*out_in)
    grad = torch.randn(ref.shape, device=ref.device, generator=torch.Generator(device=ref.device).manual_seed(1))
    (g_ref,) = torch.autograd.grad(ref, ref_in[0], grad)
    (g_out,) = torch.autograd.grad(out, out_in[0], grad)
    ref, out, step = ref.detach(), out.detach(), case.step
    return {
        "differ": int((out != ref).sum()),
        "max_steps": float(((out - ref).abs() / step).max()),
        "codes": int(((out / step).round() != (ref / step).round()).sum()),
        "grad_differ": int((g_out != g_ref).sum()),
        "n": out.numel(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 22, help="values of the activation cases")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick smoke run)")
    args = ap.parse_args()
    if args.n < 1:
        ap.error(f"--n {args.n}: the activation cases need at least one value")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    dev = torch.device(args.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    division = os.environ.get("TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING", "0")
    print(f"{where}, torch {torch.__version__}, backend {args.backend}, float32, exact division rounding: {division}")
    print("| case | entries | differ | max |Δ| in steps | codes differ | ∂(first input) differ |")
    print("|---|---|---|---|---|---|")
    for name, case in cases(args.n, dev).items():
        r = compare(case, args.backend)
        print(
            f"| {name} | {r['n']} | {r['differ']} | {r['max_steps']:.3g} | {r['codes']} | {r['grad_differ']} |",
            flush=True,
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
