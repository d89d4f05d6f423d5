"""Where, inside one synchronized training step, the device waits for the host (issue 15's 4-pass and eager
targets).

Each pass of a ``quant_overhead`` setting's step is cut at its region boundaries (set_config, the model's
call, the loss, zero_grad, backward, the optimizer step).  At each boundary the host's time since the step began
is read, and on CUDA an event is recorded there: its device time is when the device reached that point.
Where the two are equal, nothing was queued and the device had waited for the host.  Where the device's time
is larger, it was that far behind, busy.  The byte LM's compiled 4-pass step waits 1.0-1.5 ms at its start and
not between its passes (H200; benchmarks/RESULTS.md, sessions 21-22).  Eager settings run the model as it is:
MobileNetV2's eager W4A4 forward is bound by the host and the last part of its backward by the device (session 26).

GPU:  python -m benchmarks.step_waits --model lm_small@256:b64 --setting multi_cg --iters 30
      python -m benchmarks.step_waits --model mobilenet_v2@224:b128 --setting w4_kernels
CPU:  python -m benchmarks.step_waits --device cpu --backend aot_eager --model small_cnn@28:b8 --setting multi_c
      (host times only: the CPU has no events)
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections import defaultdict

import torch

import hasb
from benchmarks import quant_overhead as QO

# the settings of the float model and of int bits with the kernels on: eager, compiled, compiled with CUDA graphs
SETTINGS = tuple(k for k, (w, _, _, kernels) in QO.PLAN.items() if kernels and w in ("float", "int"))


class Clock:
    """Host time and, on CUDA, a device event at each marked point of one step (ms since the step began)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.points: list[tuple[str, float, torch.cuda.Event | None]] = []

    def start(self) -> None:
        self.points = []
        if self.cuda:
            torch.cuda.synchronize()  # the step starts with nothing queued, as a synced benchmark step does
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e0.record()
        self.t0 = time.perf_counter()

    def mark(self, label: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.points.append((label, time.perf_counter(), event))

    def read(self) -> list[tuple[str, float, float]]:
        """(label, host ms, device ms: NaN without CUDA) of every point, after the device has finished."""
        if self.cuda:
            torch.cuda.synchronize()
        nan = float("nan")
        return [(lab, 1000 * (t - self.t0), self.e0.elapsed_time(e) if e else nan) for lab, t, e in self.points]


def marked_step(model, run, x, y, loss_fn, opt, bits, bf16: bool, as_set: str = "float"):
    """``quant_overhead.train_step``'s passes (same order), with ``clock.mark`` after each region; a pass that
    runs the model as it is set (bit None) is tagged ``as_set``."""

    def step(clock: Clock) -> None:
        for b in bits:
            tag = as_set if b is None else f"{b}-bit"
            if b is not None:
                hasb.set_config(model, b)
            clock.mark(f"{tag}: set_config")
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = run(x)
                clock.mark(f"{tag}: model call")
                loss = loss_fn(out, y)
            clock.mark(f"{tag}: loss")
            opt.zero_grad(set_to_none=True)
            clock.mark(f"{tag}: zero_grad")
            loss.backward()
            clock.mark(f"{tag}: backward")
            opt.step()
            clock.mark(f"{tag}: opt.step")

    return step


def waits(spec: str, setting: str, iters: int, backend: str, dev: torch.device) -> list[tuple[str, float, float]]:
    """(point, median host ms, median device ms) over ``iters`` synced steps after three warm-up (compile) steps."""
    name, size, batch = QO.parse_model(spec)
    fmodel, x, y, loss_fn = QO.make(name, size, batch, dev)
    weights, bits, compiled, _ = QO.PLAN[setting]
    model, as_set = fmodel, "float"
    if weights != "float":
        model = hasb.quantize_model(copy.deepcopy(fmodel), bits=tuple(QO.MULTI), example_input=x[:2])
        hasb.init_quantizers(model, x[:8])
        model.train()
        bit = 4  # W4A4: the single-pass settings run the model as set here
        hasb.set_config(model, bit)
        as_set = f"{bit}-bit"
    run = (
        torch.compile(model, backend=QO.GraphCounter(backend, cudagraphs=setting.endswith("_cg")))
        if compiled
        else model
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    step = marked_step(model, run, x, y, loss_fn, opt, bits, bf16=dev.type == "cuda", as_set=as_set)
    clock = Clock(dev.type == "cuda")
    per: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with torch._dynamo.config.patch(recompile_limit=64):
        for i in range(3 + iters):
            clock.start()
            step(clock)
            if i >= 3:
                for label, host, device in clock.read():
                    per[label].append((host, device))
    return [(k, statistics.median(h for h, _ in v), statistics.median(d for _, d in v)) for k, v in per.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lm_small@256:b64", help="name@size:bBATCH")
    ap.add_argument("--setting", default="multi_cg", help=f"one of {', '.join(SETTINGS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a CPU smoke run)")
    ap.add_argument("--iters", type=int, default=30, help="synced steps timed (median per point)")
    args = ap.parse_args()
    if args.setting not in SETTINGS:
        ap.error(f"--setting {args.setting}: accepted: {', '.join(SETTINGS)}")
    if args.iters < 1:
        ap.error(f"--iters {args.iters}: need at least 1")
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    rows = waits(args.model, args.setting, args.iters, args.backend, dev)
    print(f"{args.model} {args.setting}, median of {args.iters} synced steps; ms since the step began")
    print("| after | host ms | device ms | device − host |\n|---|---|---|---|")
    for label, host, device in rows:
        dev_ms, lag = ("–", "–") if math.isnan(device) else (f"{device:.2f}", f"{device - host:+.2f}")
        print(f"| {label} | {host:.2f} | {dev_ms} | {lag} |")


if __name__ == "__main__":
    main()
