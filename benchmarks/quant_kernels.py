"""Fused Triton weight quantizer (hasb.kernels) vs the PyTorch composite, on one CUDA device.

Part 1: forward+backward of the Double Rounding + LSQ weight quantizer over every conv/linear weight of
ResNet-18 (ImageNet shapes, 11.7 M weights, 21 tensors) at W4 from INT8, one step = quantize all + backward:
  composite eager (``composite_ops``), the current eager autograd.Function (``_DoubleRoundLSQ``),
  the composite under ``torch.compile``, and the fused kernels.
Part 2: one full training step (forward, backward, SGD step; bf16 autocast) of the float model, the W4A4 hasb
model as it is (eager), and the same with the fused weight kernels patched into the quantized layers (in this
script only), each ÷ the float step of the same run.  Medians of ``--iters`` after ``--warmup``.

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


def quantizer_rows(args, device) -> list[tuple[str, float, float]]:
    """Part 1: (method, median ms, IQR ms) of quantize-all + backward."""
    ws, ss, grads = weight_set(device)

    def step_with(fn):
        def step():
            outs = [fn(w, s, 4, 8, "half_up") for w, s in zip(ws, ss, strict=True)]
            torch.autograd.backward(outs, grads)
        return step

    def composite(w, s, b, h, r):
        with Q.composite_ops():
            return Q.quantize_weight(w, s, b, h, r)

    compiled_all = torch.compile(lambda ws_, ss_: [Q.quantize_weight(w, s, 4, 8, "half_up") for w, s in zip(ws_, ss_, strict=True)])

    def compiled_step():
        torch.autograd.backward(compiled_all(ws, ss), grads)

    n = sum(w.numel() for w in ws)
    print(f"part 1: {len(ws)} ResNet-18 weight tensors, {n / 1e6:.2f} M weights, W4 from INT8, half_up", flush=True)
    rows = []
    for label, step in (("composite eager", step_with(composite)),
                        ("eager autograd.Function (current default)", step_with(Q.quantize_weight)),
                        ("composite torch.compile", compiled_step),
                        ("fused Triton kernels", step_with(K.quantize_weight))):
        med, iqr = timed(step, args.iters, args.warmup)
        rows.append((label, med, iqr))
        print(f"  {label}: {med:.3f} ms (IQR {iqr:.3f})", flush=True)
    return rows


@contextlib.contextmanager
def fused_layers():
    """Route QConv2d/QLinear weight quantization through hasb.kernels (this script only)."""
    original = QuantMixin.quant_weight

    def quant_weight(self, bit=None):
        bit = self.w_bit if bit is None else bit
        if bit is None:
            return self.weight
        return K.quantize_weight(self.weight, self.w_scale, bit, self.high_bit, self.rounding)

    QuantMixin.quant_weight = quant_weight
    try:
        yield
    finally:
        QuantMixin.quant_weight = original


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
        fmodel = build_model(name, num_classes=1000 if size >= 64 else 10, in_channels=3,
                             image_size=size).to(device).train()
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        qmodel = hasb.quantize_model(copy.deepcopy(fmodel), example_input=x[:2])
        hasb.init_quantizers(qmodel, x[:8])
        hasb.set_config(qmodel, 4)
        qmodel.train()
        t_fp = timed(train_step(fmodel, x, y, torch.optim.SGD(fmodel.parameters(), lr=1e-4)), args.iters, args.warmup)
        q_step = train_step(qmodel, x, y, torch.optim.SGD(qmodel.parameters(), lr=1e-4))
        t_q = timed(q_step, args.iters, args.warmup)
        with fused_layers():
            t_k = timed(q_step, args.iters, args.warmup)
        label = f"{name}@{size} b{batch}"
        for variant, (med, iqr) in (("float", t_fp), ("hasb W4A4 eager", t_q), ("hasb W4A4 eager + fused W", t_k)):
            rows.append((label, variant, med, iqr, med / t_fp[0]))
            print(f"  {label} {variant}: {med:.2f} ms (IQR {iqr:.2f}), {med / t_fp[0]:.3f}x float", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20, help="timed repetitions (median reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed repetitions first (compilation included)")
    ap.add_argument("--models", default="resnet18@224:128,resnet20@32:256", help="name@image_size:batch, comma-separated")
    ap.add_argument("--skip-steps", action="store_true", help="part 1 only")
    args = ap.parse_args()
    if not K.available():
        raise SystemExit("error: needs a CUDA device and Triton")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    q_rows = quantizer_rows(args, device)
    s_rows = [] if args.skip_steps else step_rows(args, device)
    print(f"\n{torch.cuda.get_device_name(device)}, torch {torch.__version__}, median of {args.iters} "
          f"after {args.warmup} warm-up (IQR = interquartile range)")
    print("| weight quantizer, fwd+bwd, all ResNet-18 weights | ms | IQR | vs composite eager |\n|---|---|---|---|")
    for label, med, iqr in q_rows:
        print(f"| {label} | {med:.3f} | {iqr:.3f} | {q_rows[0][1] / med:.2f}x faster |")
    if s_rows:
        print("\n| training step (bf16 autocast, SGD) | variant | ms | IQR | ÷ float |\n|---|---|---|---|---|")
        for model, variant, med, iqr, ratio in s_rows:
            print(f"| {model} | {variant} | {med:.2f} | {iqr:.2f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
