"""Forward+backward time of zoo models quantized at uniform 8/4/2 bits and a mixed config, ÷ the float model.

Both are measured in the same run on the same device, batch and dtype.  Prints a
table of milliseconds per step and the ratio to the float step.

CPU:  python benchmarks/quant_overhead.py
GPU:  python benchmarks/quant_overhead.py --device cuda --models resnet18,mobilenet_v2 --image-size 224 \
          --in-channels 3 --batch 256 --bf16 [--compile]
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch
import torch.nn as nn

import hasb
from hasb.models import build_model


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int, bf16: bool) -> float:
    """Median ms of one forward + backward (no optimizer step)."""
    loss_fn = nn.CrossEntropyLoss()
    dev = x.device.type
    times = []
    for i in range(iters + 3):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # warm-up (and compilation) excluded
            times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models", default="small_cnn,resnet20,resnet18,mobilenet_v2,vit_tiny", help="comma-separated zoo names"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile both the float and quantized models")
    ap.add_argument(
        "--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs) or max-autotune"
    )
    ap.add_argument("--configs", default="w8a8,w4a4,w2a2,mixed", help="which quantized configs to time")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument(
        "--composite",
        action="store_true",
        help="activation LSQ from plain ops instead of ATen's fused fake-quant kernel (eager only)",
    )
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.composite:
        hasb.quantizer._state.composite = True
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        fmodel = (
            build_model(
                name,
                num_classes=1000 if args.image_size >= 64 else 10,
                in_channels=args.in_channels,
                image_size=args.image_size,
            )
            .to(dev)
            .train()
        )
        x = torch.randn(args.batch, args.in_channels, args.image_size, args.image_size, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)
        if args.channels_last:
            fmodel = fmodel.to(memory_format=torch.channels_last)
            x = x.to(memory_format=torch.channels_last)
        qmodel = hasb.quantize_model(copy.deepcopy(fmodel), example_input=x[:2])
        hasb.init_quantizers(qmodel, x[:8])
        qmodel.train()
        rng = random.Random(0)
        mixed = hasb.BitConfig({n: rng.choice(hasb.candidate_bits(qmodel)) for n in hasb.searchable_layers(qmodel)})
        run_f = torch.compile(fmodel, mode=args.compile_mode) if args.compile else fmodel
        run_q = torch.compile(qmodel, mode=args.compile_mode) if args.compile else qmodel
        t_fp = step_time(run_f, x, y, args.iters, args.bf16)
        row = {"model": name, "float_ms": t_fp}
        wanted = args.configs.split(",")
        for label, cfg in (("w8a8", 8), ("w4a4", 4), ("w2a2", 2), ("mixed", mixed)):
            if label not in wanted:
                row[label] = float("nan")
                continue
            hasb.set_config(qmodel, cfg)
            row[label] = step_time(run_q, x, y, args.iters, args.bf16)
            print(f"  {name} {label}: {row[label]:.1f} ms ({row[label] / t_fp:.2f}x float)", flush=True)
        rows.append(row)
        print(
            f"{name}: float {t_fp:.1f} ms, "
            + ", ".join(f"{k} {row[k] / t_fp:.2f}x" for k in ("w8a8", "w4a4", "w2a2", "mixed")),
            flush=True,
        )
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\nforward+backward, {dev_name}, batch {args.batch}, {args.image_size}px, "
        f"{'bf16' if args.bf16 else 'fp32'}, {('compiled ' + (args.compile_mode or 'default')) if args.compile else 'eager'}{', composite' if args.composite else ''}{', channels_last' if args.channels_last else ''}, torch {torch.__version__}"
    )
    print("| model | float ms | w8a8 | w4a4 | w2a2 | mixed |\n|---|---|---|---|---|---|")
    for r in rows:
        f = r["float_ms"]
        print(
            f"| {r['model']} | {f:.1f} | "
            + " | ".join(f"{r[k] / f:.2f}x" for k in ("w8a8", "w4a4", "w2a2", "mixed"))
            + " |"
        )


if __name__ == "__main__":
    main()
