"""Host time dynamo spends before a compiled quantized forward runs: its cache lookups (guard checks), per forward,
against the float model's (issue 15: with CUDA graphs a step's kernels are replayed, so this host time is what is
left; on the H200 a byte-LM W4A4 forward spent 0.37 ms there against 0.04 ms for the float one, session 19).

The model is compiled as a module (``torch.compile(model)``, as ``hasb train --compile`` does), with the ``eager``
backend: dynamo's guards are the same as under inductor, and nothing is generated.  The models run on the CPU
(guards do not depend on the device), with the compiled pass's gates opened as in the tests (the pass op then runs
the composites); this process's ``hasb.kernels`` stays patched so.  Settings:

- ``float``: the model before ``quantize_model``;
- ``w4a4``: quantized, W4A4 (one config, one cache entry per frame);
- ``multi``: quantized, the configs 8, 6, 4, 2 in turn (four cache entries per frame, as the 4-pass step).

Each round times every setting (``--calls`` forwards under ``torch.profiler``, the "TorchDynamo Cache Lookup"
events' CPU time); ratios ÷ float are geometric means over the rounds with a 95% t-interval.

    python -m benchmarks.guard_cost [--model lm_small] [--rounds 5] [--calls 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import hasb
from benchmarks.quant_overhead import ratio_ci
from hasb import kernels as K
from hasb.models import build_model

MODELS = ("lm_tiny", "lm_small", "resnet20", "small_cnn")


def models(name: str) -> tuple[dict[str, tuple[torch.nn.Module, list]], torch.Tensor]:
    """({setting: (model, configs per call)}, input) for one model (see the module docstring); each model compiled
    as :func:`lookup_us` times it is ``model._guard_cost_compiled``."""
    torch.manual_seed(0)
    if name.startswith("lm"):
        fmodel, x = build_model(name, context=32), torch.randint(0, 256, (2, 32))
    else:
        fmodel, x = build_model(name), torch.randn(2, 1, 28, 28)
    q = hasb.quantize_model(copy.deepcopy(fmodel), bits=(8, 6, 4, 2), example_input=x)
    hasb.init_quantizers(q, x)
    q.train()
    hasb.set_config(q, 4)
    settings = {"float": (fmodel, [None]), "w4a4": (q, [4]), "multi": (copy.deepcopy(q), [8, 6, 4, 2])}
    for model, _ in settings.values():  # a plain attribute, not a submodule: compiled before dynamo sees the model
        model.__dict__["_guard_cost_compiled"] = torch.compile(model, backend="eager")
    return settings, x


def lookup_us(model: torch.nn.Module, configs: list, x: torch.Tensor, calls: int) -> float:
    """µs of dynamo cache lookups per forward of the compiled ``model``, cycling ``configs``."""
    compiled = model.__dict__["_guard_cost_compiled"]

    def forward(b):
        if b is not None:
            hasb.set_config(model, b)
        compiled(x)

    for b in configs * 2:  # compiles every config's graph before timing
        forward(b)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            for b in configs:
                forward(b)
    events = [e for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup"]
    if not events:  # a measurement of nothing would print 0 µs
        raise RuntimeError("the profiler recorded no 'TorchDynamo Cache Lookup' event: this torch names it otherwise")
    return sum(e.cpu_time_total for e in events) / (calls * len(configs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lm_small", help=f"one of {', '.join(MODELS)}")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 2: a confidence interval)")
    ap.add_argument("--calls", type=int, default=20, help="timed forwards per setting and round")
    args = ap.parse_args()
    if args.model not in MODELS:
        ap.error(f"--model {args.model}: not one of {', '.join(MODELS)}")
    if args.rounds < 2 or args.calls < 1:
        ap.error(f"--rounds {args.rounds} --calls {args.calls}: need at least 2 rounds and 1 call")
    # the compiled pass's gates ask for CUDA tensors and Triton: opened for the CPU as the tests do
    K.traced_batch_applies = lambda: K._enabled and torch.compiler.is_compiling()
    K.weights_fit = lambda w, s: w.dtype == torch.float32 and s.numel() == w.shape[0]
    settings, x = models(args.model)
    per: dict[str, list[float]] = {k: [] for k in settings}
    for r in range(args.rounds):
        keys = list(settings)[r % len(settings) :] + list(settings)[: r % len(settings)]
        for k in keys:
            per[k].append(lookup_us(*settings[k], x, args.calls))
    print(
        f"{args.model}, module compiled (backend eager), {args.rounds} rounds of {args.calls} calls, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| setting | µs of cache lookups per forward (median) | ÷ float | 95% CI |\n|---|---|---|---|")
    for k, us in per.items():
        if k == "float":
            print(f"| {k} | {statistics.median(us):.0f} | – | – |")
            continue
        m, lo, hi = ratio_ci(us, per["float"])
        print(f"| {k} | {statistics.median(us):.0f} | {m:.2f}x | [{lo:.2f}, {hi:.2f}] |")


if __name__ == "__main__":
    main()
