"""Fused Triton quantizer kernels (hasb.kernels) vs the PyTorch paths, on one CUDA device.

Part 1: forward+backward of the quantizers over every conv/linear tensor of ResNet-18@224, one timed step =
quantize all + backward.  Weights (21 tensors, 11.7 M, W4 from INT8): composite eager (``composite_ops``), the
composite under ``torch.compile``, the current eager autograd.Function (``_DoubleRoundLSQ``), the fused kernels,
and the bare kernel launches (no autograd: the floor of the fused path).  Activations (bf16, the conv/linear
inputs at ``--act-batch``, A4 unsigned): composite eager, composite compiled, ATen's fused fake-quant (the
current eager default), the fused kernels.
Part 2: one full training step (forward, backward, SGD step; bf16 autocast) of the float model, the W4A4 hasb
model as it is (eager), and the same with the fused weight (and activation) kernels patched into the quantized
layers (in this script only), each ÷ the float step of the same run.  Medians of ``--iters`` after ``--warmup``.

    python benchmarks/quant_kernels.py [--iters 20] [--models resnet18@224:128,resnet20@32:256]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
import torch.nn as nn

import hasb
from hasb import kernels as K
from hasb import quantizer as Q
from hasb.models import build_model
from hasb.modules import QuantMixin


def timed(fn, iters: int, warmup: int) -> tuple[float, float]:
    """(median, interquartile range) in ms of ``fn()`` over ``iters`` synchronised calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t))
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def weight_set(device: torch.device):
    """ResNet-18@224's conv and fc weights, their per-channel INT8 scales and random upstream gradients."""
    model = build_model("resnet18", num_classes=1000, in_channels=3, image_size=224)
    ws = [m.weight.detach().to(device) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ws = [w.clone().requires_grad_() for w in ws]
    ss = [Q.init_weight_scale(w, 8).requires_grad_() for w in ws]
    grads = [torch.randn_like(w) for w in ws]
    return ws, ss, grads


def activation_set(device: torch.device, batch: int):
    """bf16 tensors shaped like every conv/linear input of ResNet-18@224 at ``batch`` (post-ReLU: unsigned)."""
    model = build_model("resnet18", num_classes=1000, in_channels=3, image_size=224).to(device)
    shapes = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, a: shapes.append(a[0].shape))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224, device=device))
    for h in hooks:
        h.remove()
    xs = [
        torch.randn((batch,) + tuple(sh[1:]), device=device).relu().to(torch.bfloat16).requires_grad_() for sh in shapes
    ]
    ss = [torch.tensor(0.02, device=device, requires_grad=True) for _ in xs]
    return xs, ss, [torch.randn_like(x) for x in xs]


def _composite(fn):
    def run(*args):
        with Q.composite_ops():
            return fn(*args)

    return run


def _time_methods(methods, xs, ss, grads, args, qargs) -> list[tuple[str, float, float]]:
    """(label, median ms, IQR ms) of quantize-all-tensors + backward, per method."""
    rows = []
    for label, fn in methods:
        if isinstance(fn, tuple):  # ("compile", f): inductor compiles f's composite path (it is not eager there)
            compiled = torch.compile(lambda xs_, ss_, f=fn[1]: [f(x, s, *qargs) for x, s in zip(xs_, ss_, strict=True)])

            def step(c=compiled):
                torch.autograd.backward(c(xs, ss), grads)
        elif fn == "launch":  # the weight kernels alone: no autograd, no wrapper (the floor of the fused path)

            def step():
                for w, s, g in zip(xs, ss, grads, strict=True):
                    K._launch_forward(w.detach(), s.detach(), *qargs[:3])
                    K._launch_backward(w.detach(), s.detach(), g, *qargs[:3], 0.1)
        else:

            def step(f=fn):
                torch.autograd.backward([f(x, s, *qargs) for x, s in zip(xs, ss, strict=True)], grads)

        med, iqr = timed(step, args.iters, args.warmup)
        rows.append((label, med, iqr))
        print(f"  {label}: {med:.3f} ms (IQR {iqr:.3f})", flush=True)
    return rows


def quantizer_rows(args, device) -> list[tuple[str, str, float, float]]:
    """Part 1: (what, method, median ms, IQR ms) of quantize-all + backward, weights then activations."""
    ws, ss, grads = weight_set(device)
    what = f"{len(ws)} ResNet-18 weights ({sum(w.numel() for w in ws) / 1e6:.1f} M), W4 of INT8"
    print(f"part 1: {what}", flush=True)
    rows = [
        (what, *r)
        for r in _time_methods(
            [
                ("composite eager", _composite(Q.quantize_weight)),
                ("composite torch.compile", ("compile", Q.quantize_weight)),
                ("eager autograd.Function (current default)", Q.quantize_weight),
                ("fused Triton kernels", K.quantize_weight),
                ("kernel launches only, no autograd", "launch"),
            ],
            ws,
            ss,
            grads,
            args,
            (4, 8, "half_up"),
        )
    ]
    del ws, ss, grads
    xs, ss, grads = activation_set(device, args.act_batch)
    what = f"{len(xs)} ResNet-18@224 b{args.act_batch} bf16 activations ({sum(x.numel() for x in xs) / 1e6:.0f} M), A4"
    print(f"part 1: {what}", flush=True)
    rows += [
        (what, *r)
        for r in _time_methods(
            [
                ("composite eager", _composite(Q.quantize_activation)),
                ("composite torch.compile", ("compile", Q.quantize_activation)),
                ("ATen fused fake-quant (current default)", Q.quantize_activation),
                ("fused Triton kernels", K.quantize_activation),
            ],
            xs,
            ss,
            grads,
            args,
            (4, False),
        )
    ]
    return rows


@contextlib.contextmanager
def fused_layers(activations: bool):
    """Route QConv2d/QLinear weight (and activation) quantization through hasb.kernels (this script only)."""
    original = QuantMixin.quant_weight, Q.quantize_activation, QuantMixin._batch_weights

    def quant_weight(self, bit=None):
        bit = self.w_bit if bit is None else bit
        if bit is None:
            return self.weight
        return K.quantize_weight(self.weight, self.w_scale, bit, self.high_bit, self.rounding)

    QuantMixin.quant_weight = quant_weight
    QuantMixin._batch_weights = lambda self: None  # per-layer launches: no pass kernel (hasb's default) beside
    if activations:  # modules.py calls Q.quantize_activation; hasb.kernels keeps its own handle on the original
        Q.quantize_activation = K.quantize_activation
    try:
        yield
    finally:
        QuantMixin.quant_weight, Q.quantize_activation, QuantMixin._batch_weights = original


def train_step(model: nn.Module, x, y, opt):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def step_rows(args, device) -> list[tuple[str, str, float, float, float]]:
    """Part 2: (model, variant, median ms, IQR ms, ratio to float) of one SGD training step."""
    rows = []
    for spec in args.models.split(","):
        name, rest = spec.split("@")
        size, batch = (int(v) for v in rest.split(":"))
        torch.manual_seed(0)
        fmodel = (
            build_model(name, num_classes=1000 if size >= 64 else 10, in_channels=3, image_size=size).to(device).train()
        )
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        qmodel = hasb.quantize_model(copy.deepcopy(fmodel), example_input=x[:2])
        hasb.init_quantizers(qmodel, x[:8])
        hasb.set_config(qmodel, 4)
        qmodel.train()
        t_fp = timed(train_step(fmodel, x, y, torch.optim.SGD(fmodel.parameters(), lr=1e-4)), args.iters, args.warmup)
        q_step = train_step(qmodel, x, y, torch.optim.SGD(qmodel.parameters(), lr=1e-4))
        t_q = timed(q_step, args.iters, args.warmup)
        with fused_layers(activations=False):
            t_k = timed(q_step, args.iters, args.warmup)
        with fused_layers(activations=True):
            t_ka = timed(q_step, args.iters, args.warmup)
        label = f"{name}@{size} b{batch}"
        for variant, (med, iqr) in (
            ("float", t_fp),
            ("hasb W4A4 eager", t_q),
            ("hasb W4A4 eager + fused W", t_k),
            ("hasb W4A4 eager + fused W and A", t_ka),
        ):
            rows.append((label, variant, med, iqr, med / t_fp[0]))
            print(f"  {label} {variant}: {med:.2f} ms (IQR {iqr:.2f}), {med / t_fp[0]:.3f}x float", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20, help="timed repetitions (median reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed repetitions first (compilation included)")
    ap.add_argument(
        "--models", default="resnet18@224:128,resnet20@32:256", help="name@image_size:batch, comma-separated"
    )
    ap.add_argument("--act-batch", type=int, default=64, help="batch of the part-1 activation tensors")
    ap.add_argument("--skip-steps", action="store_true", help="part 1 only")
    args = ap.parse_args()
    if not K.available():
        raise SystemExit("error: needs a CUDA device and Triton")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    q_rows = quantizer_rows(args, device)
    s_rows = [] if args.skip_steps else step_rows(args, device)
    print(
        f"\n{torch.cuda.get_device_name(device)}, torch {torch.__version__}, median of {args.iters} "
        f"after {args.warmup} warm-up (IQR = interquartile range)"
    )
    print("| quantizer fwd+bwd over | method | ms | IQR | speed-up vs composite eager |\n|---|---|---|---|---|")
    first = {}
    for what, label, med, iqr in q_rows:
        first.setdefault(what, med)
        print(f"| {what} | {label} | {med:.3f} | {iqr:.3f} | {first[what] / med:.2f}x |")
    if s_rows:
        print("\n| training step (bf16 autocast, SGD) | variant | ms | IQR | ÷ float |\n|---|---|---|---|---|")
        for model, variant, med, iqr, ratio in s_rows:
            print(f"| {model} | {variant} | {med:.2f} | {iqr:.2f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
