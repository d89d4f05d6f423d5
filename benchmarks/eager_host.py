"""Where an eager quantized training step's extra time goes (issue 15's eager targets): the float step against the
quantized model with its weights, its activations or both at 4 bits, in interleaved rounds, as ms and as extra µs
per quantized layer.  On a GPU the activations can also go through ATen's learnable fake-quant op (``--aten``: a
C++ autograd node instead of hasb's Triton Function), and W4A4 can run with hasb's launches as no-ops
(``--host-share``: the extra time left is the host's share, the rest the kernels'), or with the pass's Ŵ in
float32 and cast by autocast in every layer (``--float32-pass``: what those casts cost), or with every launch
through Triton's JIT (``--jit-launches``: what hasb's direct launches save).

``--emulate`` measures the host side without a GPU: on the CPU, every Triton launch of hasb.kernels becomes a
no-op, the kernel path's CUDA checks are told the tensors are on CUDA and a concatenation returns an empty
buffer (on a GPU it is one launch), so what is left is the Python, autograd and aten-call cost the eager kernel
path adds per layer.  Use a tiny image (8 px) there so that the convolutions themselves cost little, and a model
with few parameters: the CPU still makes the copies a GPU does in microseconds (weight gradients into the
weights' layout, the optimizer's update), which swamp a ResNet-18's rows.  The emulation patches torch and hasb
in this process: run it as its own process, never imported into another.

    python -m benchmarks.eager_host --models mobilenet_v2@224:b128,resnet18@224:b256 [--aten] [--host-share]  # GPU
    python -m benchmarks.eager_host --emulate --models mobilenet_v2@8:b2                        # any CPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import types

import torch

import hasb
from benchmarks.quant_overhead import interleaved, make, parse_model, train_step
from hasb import kernels as K
from hasb import modules as M

# hasb's Triton kernels by attribute (the activation ones are defined only where Triton imports)
KERNELS = (
    "_wq_fwd_kernel",
    "_wq_bwd_kernel",
    "_wq_fwd_many_kernel",
    "_wq_bwd_many_kernel",
    "_aq_fwd_kernel",
    "_aq_bwd_kernel",
)


class _NoLaunch:
    """A Triton kernel's stand-in: ``kernel[grid](...)`` launches nothing (and counts the call)."""

    def __getitem__(self, grid):
        return _count_launch


def emulate_launches() -> None:
    """Turn this process's kernel path into its host cost alone (see the module docstring)."""
    for name in KERNELS:
        setattr(K, name, _NoLaunch())
    K.triton = types.SimpleNamespace(cdiv=lambda a, b: -(-a // b))
    torch.Tensor.is_cuda = property(lambda self: True)  # type: ignore[assignment, method-assign]
    fake = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
    real_tensor = torch.tensor
    fake.tensor = lambda *a, pin_memory=False, **kw: real_tensor(*a, **kw)
    fake.cat = lambda ts: torch.empty(sum(t.numel() for t in ts), dtype=ts[0].dtype)
    fake.cuda = types.SimpleNamespace(is_available=lambda: False, current_device=lambda: 0)
    K.torch = fake  # type: ignore[attr-defined]


LAUNCHES = [0]  # no-op launches so far (--emulate): shows that the steps took the kernel path


def _count_launch(*args, **kwargs) -> None:
    LAUNCHES[0] += 1


def without_launches(step):
    """``step`` with every hasb kernel launch a no-op (the outputs are left unwritten): on a GPU, what is left of
    the step's extra time is the host's share (Python, autograd, ATen calls), the rest is the kernels' (their GPU
    time and driver launches).  The kernels are back after each call, also after an exception."""

    def run():
        real = {name: getattr(K, name, None) for name in KERNELS}  # None: not defined (no Triton here)
        for name in KERNELS:
            setattr(K, name, _NoLaunch())
        try:
            step()
        finally:
            for name, kernel in real.items():
                if kernel is None:
                    delattr(K, name)
                else:
                    setattr(K, name, kernel)

    return run


def _with_patched(attr: str, make, step):
    """``step`` with ``hasb.kernels.<attr>`` replaced by ``make(real)``; the real one is back after each call, also
    after an exception."""

    def run():
        real = getattr(K, attr)
        setattr(K, attr, make(real))
        try:
            step()
        finally:
            setattr(K, attr, real)

    return run


def with_float32_pass(step):
    """``step`` with the pass's Ŵ in float32 even under autocast, so that every layer casts its own (hasb before
    session 13): the difference to W4A4 is what those casts cost."""
    return _with_patched(
        "quantize_weights",
        lambda real: lambda ws, scales, bits, highs, rounding, out_dtype=None: real(ws, scales, bits, highs, rounding),
        step,
    )


def with_jit_launches(step):
    """``step`` with every activation launch through Triton's JIT (hasb before session 14): the difference to W4A4
    is what :func:`hasb.kernels.launch` saves."""
    return _with_patched("launch", lambda real: lambda kernel, blocks, *args: kernel[(blocks,)](*args), step)


def steps_of(
    spec: str,
    dev: torch.device,
    aten: bool,
    host_share: bool = False,
    float32_pass: bool = False,
    jit_launches: bool = False,
) -> tuple[dict, int]:
    """({variant: step()} for one model, the number of its quantized layers, how many of them share an input)."""
    name, size, batch = parse_model(spec)
    fmodel, x, y, loss_fn = make(name, size, batch, dev)

    def quantized(w: bool, a: bool) -> torch.nn.Module:
        q = hasb.quantize_model(copy.deepcopy(fmodel), bits=(8, 6, 4, 2), example_input=x[:2])
        hasb.init_quantizers(q, x[: min(8, batch)])
        q.train()
        hasb.set_config(q, 4)
        for m in q.modules():
            if isinstance(m, M.QuantMixin):
                m.w_bit, m.a_bit = (m.w_bit if w else None), (m.a_bit if a else None)
        return q

    def step(model: torch.nn.Module, use_aten: bool = False):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)

        def loss_of():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                return loss_fn(model(x), y)

        inner = train_step(model, loss_of, opt, [None])

        def run():  # the activation path of this variant (the kernels' own test, or ATen's op through the fallback)
            K.act_fused_applies = (lambda x, s: False) if use_aten else _act_fused_applies
            inner()

        return run

    models = {"q_fp": (0, 0), "q_w4": (1, 0), "q_a4": (0, 1), "q_w4a4": (1, 1)}
    steps = {"float": step(copy.deepcopy(fmodel))} | {k: step(quantized(*wa)) for k, wa in models.items()}
    if aten:
        steps["q_w4a4_aten"] = step(quantized(1, 1), use_aten=True)
    if host_share:  # its own model: unwritten outputs and gradients would poison the others' parameters
        steps["q_w4a4_host"] = without_launches(step(quantized(1, 1)))
    if float32_pass:
        steps["q_w4a4_f32pass"] = with_float32_pass(step(quantized(1, 1)))
    if jit_launches:
        steps["q_w4a4_jit"] = with_jit_launches(step(quantized(1, 1)))
    # layers that W4A4 quantizes (a model's first and last layers may stay at full precision), and how many of
    # them take the x̂ of another layer fed the same input (hasb.quantize_model's shared inputs)
    w4a4 = quantized(1, 1)
    layers = sum(isinstance(m, M.QuantMixin) and m.w_bit is not None for m in w4a4.modules())
    return steps, layers, sum(len(g) - 1 for g in w4a4.hasb_spec.shared_inputs)


_act_fused_applies = K.act_fused_applies


def _no_prepare(key: str, model, bits) -> None:
    """Each variant's step sets its own activation path (see :func:`steps_of`)."""


def print_table(spec: str, per: dict[str, list[float]], layers: int, where: str) -> None:
    base = statistics.median(per["float"])
    print(f"\n{spec} on {where}: {layers} quantized layers, median over {len(per['float'])} rounds")
    print("| variant | ms | ÷ float | extra µs per quantized layer | rounds (ms) |\n|---|---|---|---|---|")
    for k, ms in per.items():
        m = statistics.median(ms)
        extra = (m - base) / layers * 1000
        print(f"| {k} | {m:.2f} | {m / base:.3f}x | {extra:.0f} | {' '.join(f'{v:.2f}' for v in ms)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2@224:b128,resnet18@224:b256", help="name@size:bBATCH, ...")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--iters", type=int, default=6, help="timed steps per round (median)")
    ap.add_argument("--aten", action="store_true", help="also W4A4 with ATen's learnable fake-quant activations")
    ap.add_argument("--emulate", action="store_true", help="CPU: the kernel path's host cost, launches as no-ops")
    ap.add_argument(
        "--host-share", action="store_true", help="also W4A4 with hasb's launches as no-ops (the host's share)"
    )
    ap.add_argument("--float32-pass", action="store_true", help="also W4A4 with float32 Ŵ cast per layer by autocast")
    ap.add_argument("--jit-launches", action="store_true", help="also W4A4 with every launch through Triton's JIT")
    args = ap.parse_args()
    if args.rounds < 1 or args.iters < 1:
        ap.error(f"--rounds {args.rounds} --iters {args.iters}: both must be at least 1")
    if not args.emulate and not torch.cuda.is_available():
        ap.error("no GPU here: the eager kernel path runs on CUDA; --emulate measures its host cost on the CPU")
    if args.emulate and args.aten:
        ap.error("--aten needs a GPU (ATen's op would run on the CPU in the emulation)")
    if args.emulate and args.host_share:
        ap.error("--host-share needs a GPU (in the emulation every launch is a no-op already)")
    if args.emulate:
        torch.set_num_threads(1)
        emulate_launches()
    dev = torch.device("cpu" if args.emulate else "cuda")
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    where = "CPU, launches emulated (1 thread)" if args.emulate else torch.cuda.get_device_name(dev)
    for spec in args.models.split(","):
        steps, layers, shared = steps_of(spec, dev, args.aten, args.host_share, args.float32_pass, args.jit_launches)
        # the variants take turns in every round (order rotated), each timed after one untimed step
        per = interleaved(args.rounds, args.iters, dev, {k: (s, None, None) for k, s in steps.items()}, _no_prepare)
        print_table(spec, per, layers, where)
        if args.emulate:  # a layer that fell back to the composite would launch nothing
            LAUNCHES[0] = 0
            steps["q_w4a4"]()
            print(
                f"kernel launches per W4A4 step: {LAUNCHES[0]} (2 per quantized input: {layers} layers, {shared} "
                "of them sharing another's; 2 for all the weights)"
            )


if __name__ == "__main__":
    main()
