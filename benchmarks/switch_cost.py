"""Host time of switching a quantized model's bits (issue 15): ``hasb.set_config`` per call, cycling the configs of
the 4-pass step (8, 6, 4, 2), against the same switch written straight into the layers (``QuantMixin.set_bits``
in a loop over a list made once: no names resolved, no config validated), measured in the same process.

Why it matters: a multi-precision step switches between its passes, where a compiled step's GPU has run out of
work and waits for the host (a profile of the byte LM's 4-pass step on the H200 found ``set_config`` inside the
GPU's idle time, about 1 ms per pass under the profiler; benchmarks/RESULTS.md, session 20).

    python -m benchmarks.switch_cost [--models lm_small,resnet18,mobilenet_v2] [--calls 400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import hasb
from benchmarks.quant_overhead import ratio_ci
from hasb.models import build_model
from hasb.quantize import quantized_layers, searchable_layers

CONFIGS = (8, 6, 4, 2)


def quantized(name: str) -> torch.nn.Module:
    """``name`` from the zoo, quantized with bits 8, 6, 4, 2 (LMs: context 64; CNNs: 3×32×32 inputs)."""
    torch.manual_seed(0)
    if name.startswith("lm"):
        model, x = build_model(name, context=64), torch.randint(0, 256, (2, 64))
    else:
        model, x = build_model(name, in_channels=3, image_size=32), torch.randn(2, 3, 32, 32)
    return hasb.quantize_model(model, bits=CONFIGS, example_input=x)


def per_call_us(switch, calls: int) -> float:
    """Mean µs of ``switch(bit)`` over ``calls`` calls cycling :data:`CONFIGS`."""
    t = time.perf_counter()
    for i in range(calls):
        switch(CONFIGS[i % len(CONFIGS)])
    return 1e6 * (time.perf_counter() - t) / calls


def measure(name: str, calls: int, rounds: int) -> tuple[int, list[float], list[float]]:
    """(quantized layers, µs per set_config call per round, µs per direct switch per round); rounds alternate."""
    model = quantized(name)
    by_name = quantized_layers(model)
    layers = [by_name[n] for n in searchable_layers(model)]  # fixed layers keep their bit
    a_bits = {m: m.a_bit for m in layers}  # weight-only layers keep their activations as quantize_model set them

    def direct(bit: int) -> None:
        for m in layers:
            m.set_bits(bit, bit if a_bits[m] is not None else None)

    def validated(bit: int) -> None:
        hasb.set_config(model, bit)

    per_call: list[float] = []
    per_direct: list[float] = []
    for r in range(rounds):
        pair = [(validated, per_call), (direct, per_direct)]
        for fn, out in pair if r % 2 == 0 else pair[::-1]:
            fn(CONFIGS[-1])  # warm
            out.append(per_call_us(fn, calls))
    hasb.set_config(model, CONFIGS[0])
    if any(m.w_bit != CONFIGS[0] for m in layers):
        raise RuntimeError("set_config left a layer at another bit")
    return len(by_name), per_call, per_direct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lm_small,resnet18,mobilenet_v2", help="comma-separated zoo names")
    ap.add_argument("--calls", type=int, default=400, help="switches per round and setting")
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds (>= 2: a confidence interval)")
    args = ap.parse_args()
    if args.rounds < 2 or args.calls < 1:
        ap.error(f"--rounds {args.rounds} --calls {args.calls}: need at least 2 rounds and 1 call")
    print(f"torch {torch.__version__}, {args.rounds} rounds of {args.calls} switches cycling {CONFIGS}")
    print("| model | layers | set_config µs per call | direct µs per call | set_config ÷ direct | 95% CI |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        n, sc, direct = measure(name, args.calls, args.rounds)
        m, lo, hi = ratio_ci(sc, direct)
        print(
            f"| {name} | {n} | {statistics.median(sc):.1f} | {statistics.median(direct):.1f} | {m:.2f}x "
            f"| [{lo:.2f}, {hi:.2f}] |"
        )


if __name__ == "__main__":
    main()
