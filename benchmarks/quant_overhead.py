"""The quantized training step ÷ the float step (issue 15), optimizer included, measured side by side in one run.

For each model: the float step (eager and ``torch.compile``), one hasb W4A4 pass (eager through the composite ops,
eager through the fused Triton kernels of ``hasb/kernels.py``, compiled), and the 4-pass multi-precision step
(one forward/backward and one optimizer step per candidate bit, as hasb's trainer runs Alg. A.2; until session 6
the benchmark took one optimizer step per 4 passes), eager with kernels, compiled, and compiled with bits as data
(``hasb.bits_as_data``: the active bits are tensors, one graph for every config); every compiled setting also with
inductor's CUDA graphs (``*_cg``, as ``mode="reduce-overhead"``).  Compiled W4A4 puts one backward kernel per
activation quantizer whose input comes from a batch norm in the graph (``hasb.kernels.lsq_act_backward``;
``quantize_model`` marks them) and leaves the others to inductor; ``w4_allop_c`` puts the op on every layer
(sessions 14-15), ``w4_inductor_c`` (and the 4-pass ``multi_inductor_c``) on none, with the kernels off (hasb before
session 14).  Compiled, a pass's weights are one op each way (``hasb.kernels.quantize_weights_traced``);
``w4_layerw_c`` and ``multi_layerw_c`` leave each layer's weight to inductor (hasb before session 18).  Compile
cost: seconds spent in the first steps and the number of graphs dynamo compiled (switching bit
configs recompiles while the active bits are Python ints on the layers; with bits as data it should not).

GPU:  python -m benchmarks.quant_overhead --device cuda
      (``--rounds 5``: then time every setting again in 5 interleaved rounds, each step synchronized and then the
      steps back to back as a training loop runs them, and print each ratio with a 95% CI;
      identical settings measured one after the other differed by up to 5% on a shared host)
CPU:  python -m benchmarks.quant_overhead --device cpu --models resnet20@28:b32 --iters 3 --backend aot_eager  (smoke)
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import hasb
from hasb import kernels as K
from hasb.models import build_model
from hasb.modules import QuantMixin

DEFAULT_MODELS = "resnet18@224:b256,mobilenet_v2@224:b128,resnet18@32:b256,lm_small@256:b64"


def parse_model(spec: str) -> tuple[str, int, int]:
    """``name@size:bBATCH`` → (zoo name, image size or LM context, batch)."""
    name, rest = spec.split("@")
    size, batch = rest.split(":b")
    return name, int(size), int(batch)


def make(name: str, size: int, batch: int, dev: torch.device):
    """(float model, inputs, targets, loss function) for one benchmark row."""
    torch.manual_seed(0)
    if name.startswith("lm_"):
        model = build_model(name, context=size).to(dev)
        x = torch.randint(0, 256, (batch, size), device=dev)
        return (
            model,
            x,
            torch.randint(0, 256, (batch, size), device=dev),
            lambda o, y: F.cross_entropy(o.flatten(0, 1), y.flatten()),
        )
    classes = 1000 if size >= 64 else 10
    model = build_model(name, num_classes=classes, in_channels=3, image_size=size).to(dev)
    x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit it
    return model, x, torch.randint(0, classes, (batch,), device=dev), F.cross_entropy


def timed(step, iters: int, warmup: int, dev: torch.device) -> tuple[float, float]:
    """(median ms of ``step()`` over ``iters`` after ``warmup``, seconds the warm-up took: compile time)."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times), first


def train_step(model: nn.Module, loss_of, opt, bits):
    """One forward/backward and optimizer step per entry of ``bits`` (None: the model as it is), as hasb's
    trainer runs Alg. A.2 (each precision updates the shared weights in turn); ``loss_of()`` runs one pass's
    forward and loss.  Gradients are cleared where the trainer clears them (``hasb.train_step._optimizer_pass``):
    after the forward, before the backward.  The host's zero_grad then runs while the forward's kernels do: the
    compiled float step of the byte LM 0.977x [0.968, 0.986] against clearing before the forward, its 4-pass step
    unchanged (H200, synced steps; benchmarks/RESULTS.md, session 22)."""

    def step():
        for b in bits:
            if b is not None:
                hasb.set_config(model, b)
            loss = loss_of()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


class GraphCounter:
    """A torch.compile backend that counts the graphs it is given and hands them to ``backend`` (inductor: the
    real measurement; ``eager``/``aot_eager`` for a quick smoke run without code generation)."""

    def __init__(self, backend: str = "inductor", cudagraphs: bool = False, patches: dict | None = None):
        self.graphs = 0
        self.backend = backend
        self.cudagraphs = cudagraphs  # inductor's CUDA graphs (mode="reduce-overhead"): no per-kernel host launches
        self.patches = patches or {}  # more inductor config for these graphs (benchmarks/inductor_knobs.py)

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        if self.backend == "inductor":
            patches = {"triton.cudagraphs": self.cudagraphs, **self.patches}
            return compile_fx(gm, example_inputs, config_patches=patches)
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)


def measure(model, x, y, loss_fn, bits, args, dev, compiled: bool, key: str = "", patches=None) -> dict:
    counter = GraphCounter(args.backend, cudagraphs=key.endswith("_cg"), patches=patches)
    run = torch.compile(model, backend=counter) if compiled else model

    def loss_of():  # the model compiled, the loss eager: as ``hasb train --compile`` runs it
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            return loss_fn(run(x), y)

    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    step = train_step(model, loss_of, opt, bits)
    skips = _cudagraph_skips()
    ms, first = timed(step, args.iters, args.warmup, dev)
    if args.profile:
        profile(step, f"{key} ({ms:.2f} ms/step)", args.profile, dev)
    out = {"ms": ms, "first_s": first, "graphs": counter.graphs}
    if counter.cudagraphs and dev.type == "cuda":  # graphs inductor compiled but would not capture
        out["cudagraph_skips"] = _cudagraph_skips() - skips
    if args.rounds:
        STEPS[key] = (step, model, bits)  # kept (compiled) for the interleaved rounds
    return out


# --rounds: every measured setting's step, by key, to time again round-robin (see :func:`interleaved`)
STEPS: dict[str, tuple] = {}


def base_of(key: str) -> str:
    """The float setting a setting is divided by: the same mode (eager, compiled, compiled with CUDA graphs)."""
    return "float_cg" if key.endswith("_cg") else "float_c" if key.endswith("_c") else "float"


def interleaved(
    rounds: int, iters: int, dev: torch.device, steps: dict | None = None, prepare=None, back_to_back: bool = False
) -> dict:
    """Median ms of ``iters`` steps of every kept step, per round: {key: [ms per round]}.  The steps take turns in
    each round (order rotated every round), so that a slow phase of the host (another job, clocks) falls on all
    of them.  ``steps``: {key: (step, model, bits)} (default: the settings kept by :func:`measure`);
    ``prepare(key, model, bits)`` runs before each key's turn (default: that setting's kernels and W4A4).
    ``back_to_back``: a round's time is instead the ms per step of ``iters`` steps run with no synchronization
    between them (:func:`host_times`), as a training loop runs them: no step then starts on an idle device."""
    steps = STEPS if steps is None else steps
    keys = list(steps)
    per: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            step, model, bits = steps[k]
            (prepare or _prepare_setting)(k, model, bits)
            # either way one untimed step first: a switch may re-record CUDA graphs
            if back_to_back:
                per[k].append(host_times(step, iters, dev)[1])
            else:
                per[k].append(timed(step, iters, 1, dev)[0])
    return per


def host_times(step, iters: int, dev: torch.device) -> tuple[float, float]:
    """(mean ms the host spends in one ``step()`` call, ms per step to the device's end) over ``iters`` steps
    run back to back with no synchronization between them.  A step is bound by the host when the first reaches
    the second: its kernels then wait for their launches, and a faster GPU would not shorten it (the byte LM's
    compiled quantized passes on the H200, benchmarks/RESULTS.md, session 20)."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    step()  # a switch of setting may re-record CUDA graphs
    sync()
    t0 = time.perf_counter()
    host = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        host.append(time.perf_counter() - t)
    sync()
    return 1000 * sum(host) / iters, 1000 * (time.perf_counter() - t0) / iters


def print_host(title: str, iters: int, dev: torch.device) -> None:
    """Every kept setting's :func:`host_times` (prepared as for the rounds), one table, with the same steps timed
    synchronized as the rounds time them.  Synced minus back to back is the time per step that the device waits
    for the host: a step starts with nothing queued, so its first kernels wait for their launches (the byte LM's
    4-pass step waits 1.0-1.5 ms at its start and not between its passes; benchmarks/RESULTS.md, session 22)."""
    print(f"\n{title}: the host's time per step, {iters} steps back to back with no synchronization between them")
    print(
        "| setting | host ms per step | ms per step to the device's end | host ÷ device end | synced ms per step "
        "| synced − back to back ms |\n|---|---|---|---|---|---|"
    )
    for k, (step, model, bits) in STEPS.items():
        _prepare_setting(k, model, bits)
        host, end = host_times(step, iters, dev)
        synced = timed(step, iters, 1, dev)[0]
        print(f"| {k} | {host:.2f} | {end:.2f} | {host / end:.2f} | {synced:.2f} | {synced - end:+.2f} |")


def _prepare_setting(key: str, model, bits) -> None:
    weights, _, _, kernels = PLAN[key]
    K.enable(kernels)
    weights_per_layer(weights == "int_layerw")
    if bits == [None] and weights != "float":  # a 4-pass step may have run since: back to W4A4
        hasb.set_config(model, 4)


def ratio_ci(ms: list[float], base: list[float]) -> tuple[float, float, float]:
    """Geometric mean of the per-round ratios ms/base and its 95% t-interval (rounds are paired: same phase)."""
    from scipy import stats

    logs = [math.log(a / b) for a, b in zip(ms, base, strict=True)]
    mean = statistics.fmean(logs)
    half = stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else 0
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def print_rounds(title: str, per: dict[str, list[float]], base=base_of) -> None:
    """The rounds' table: each key's median ms and its ratio to ``base(key)`` (a key of ``per``) with a 95% CI."""
    rounds = len(next(iter(per.values())))
    print(f"\n{title}: {rounds} interleaved rounds; ratio = geometric mean of the per-round ratios, 95% t-interval")
    print("| setting | median ms over rounds | ratio | 95% CI |\n|---|---|---|---|")
    for k, ms in per.items():
        b = base(k)
        if k == b or b not in per:
            print(f"| {k} | {statistics.median(ms):.2f} | – | – |")
            continue
        m, lo, hi = ratio_ci(ms, per[b])
        print(f"| {k} | {statistics.median(ms):.2f} | {m:.3f}x ÷ {b} | [{lo:.3f}, {hi:.3f}] |")
    for k, ms in per.items():  # the rounds themselves: a wide interval shows whether one phase or all rounds vary
        print(f"  {k} per round (ms): " + " ".join(f"{v:.2f}" for v in ms))


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def profile(step, title: str, top: int, dev: torch.device, steps: int = 3) -> None:
    """Where a (warm) step spends device time: the ``top`` kernels by total time over ``steps`` steps, per step,
    and the kernel launches per step (the question of issue 15: what does bits as data add to a compiled step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    attr = "device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if dev.type == "cuda":  # kernels only: the CPU-side ops would count their kernels twice
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events) / steps / 1000
    launches = sum(e.count for e in events) / steps
    print(
        f"\n[profile] {title}: {total:.2f} ms of {'kernels' if dev.type == 'cuda' else 'CPU ops'} per step, "
        f"{launches:.0f} launches per step; top {top}:"
    )
    for e in events[:top]:  # whole names: a Triton kernel's numeric suffix finds its source in inductor's cache
        print(f"  {getattr(e, attr) / steps / 1000:8.3f} ms  {e.count / steps:6.0f}x  {e.key}")
    if dev.type == "cuda":  # host side: what keeps the GPU waiting (syncs, copies, Python between launches)
        host = sorted(
            (e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
            key=lambda e: -e.self_cpu_time_total,
        )
        print(f"  host, by self CPU time (top {top}):")
        for e in host[:top]:
            print(f"  {e.self_cpu_time_total / steps / 1000:8.3f} ms  {e.count / steps:6.0f}x  {e.key[:110]}")


# key → (weights: float / int bits / bits as data, bit passes, compiled, fused kernels on); a ``_cg`` key is its
# ``_c`` twin with inductor's CUDA graphs (what ``mode="reduce-overhead"`` and ``hasb train --compile`` on CUDA use)
MULTI = [8, 6, 4, 2]
PLAN: dict[str, tuple[str, list, bool, bool]] = {
    "float": ("float", [None], False, True),
    "float_c": ("float", [None], True, True),
    "w4_composite": ("int", [None], False, False),
    "w4_kernels": ("int", [None], False, True),
    "multi_kernels": ("int", MULTI, False, True),
    "w4_c": ("int", [None], True, True),
    "w4_inductor_c": ("int", [None], True, False),  # kernels off: inductor also makes the activations' backward
    "w4_allop_c": ("int_allop", [None], True, True),  # the backward op on every layer, not only after batch norms
    "w4_layerw_c": ("int_layerw", [None], True, True),  # each layer's weight by inductor (hasb before session 18)
    "multi_c": ("int", MULTI, True, True),
    "multi_inductor_c": ("int", MULTI, True, False),  # the 4-pass step with inductor's activation backward only
    "multi_layerw_c": ("int_layerw", MULTI, True, True),
    "w4_data_c": ("data", [None], True, True),  # the same weights, bits as tensors: one graph for every config
    "multi_data_c": ("data", MULTI, True, True),
}
PLAN.update({k[:-2] + "_cg": v for k, v in PLAN.items() if k.endswith("_c")})
SETTINGS = tuple(PLAN)


_TRACED_BATCH = K.traced_batch_applies


def weights_per_layer(on: bool) -> None:
    """Compiled graphs traced from now on quantize each layer's weight by inductor's composite (``on``) or the
    pass's weights as one op each way (hasb's default, :func:`hasb.kernels.quantize_weights_traced`).  A graph
    traced either way is kept: dynamo guards on the function, so switching back reuses it."""
    K.traced_batch_applies = (lambda: False) if on else _TRACED_BATCH


def backward_op_everywhere(model: nn.Module) -> nn.Module:
    """``model`` with every quantized layer's compiled activation backward as hasb's kernel op, where
    ``quantize_model`` marks only the layers fed by a batch norm (``QuantMixin.act_backward_op``)."""
    for m in model.modules():
        if isinstance(m, QuantMixin):
            m.act_backward_op = True
    return model


def row(spec: str, args, dev: torch.device) -> dict:
    """Every setting of ``args.settings`` for one model (a subset keeps a device call short)."""
    name, size, batch = parse_model(spec)
    fmodel, x, y, loss_fn = make(name, size, batch, dev)
    qmodel = hasb.quantize_model(copy.deepcopy(fmodel), bits=(8, 6, 4, 2), example_input=x[:2])
    hasb.init_quantizers(qmodel, x[:8])
    qmodel.train()
    factory = {
        "float": lambda: copy.deepcopy(fmodel),
        "int": lambda: qmodel,
        "data": lambda: hasb.bits_as_data(copy.deepcopy(qmodel)),
        "int_allop": lambda: backward_op_everywhere(copy.deepcopy(qmodel)),
        "int_layerw": lambda: copy.deepcopy(qmodel),
    }
    r: dict = {"model": spec}
    hasb.set_config(qmodel, 4)
    STEPS.clear()
    # with --rounds every setting's graphs stay cached on the same code objects (16 for all settings at once):
    # past dynamo's default limit of 8 a setting would silently run eager
    with torch._dynamo.config.patch(recompile_limit=64 if args.rounds else torch._dynamo.config.recompile_limit):
        for key in (k for k in SETTINGS if k in set(args.settings)):
            weights, bits, compiled, kernels = PLAN[key]
            K.enable(kernels)
            weights_per_layer(weights == "int_layerw")
            if not args.rounds:  # every compiled setting counts its own graphs and compile seconds; with --rounds
                torch._dynamo.reset()  # the steps must stay valid (a later setting may reuse a cached graph)
            r[key] = measure(factory[weights](), x, y, loss_fn, bits, args, dev, compiled, key)
            print(f"[{spec}] {key}: {r[key]}", flush=True)  # a run cut short still leaves its finished settings
            hasb.set_config(qmodel, 4)
        if args.rounds:
            print_rounds(f"{spec}, each step synchronized", interleaved(args.rounds, args.iters, dev))
            b2b = interleaved(args.rounds, args.iters, dev, back_to_back=True)
            print_rounds(f"{spec}, steps back to back (ms per step to the device's end)", b2b)
            print_host(spec, args.iters, dev)
    STEPS.clear()
    K.enable(True)
    weights_per_layer(False)
    print(spec, {k: v for k, v in r.items() if k != "model"}, flush=True)
    return r


def print_table(rows: list[dict], args, dev: torch.device) -> None:
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\n{where}, torch {torch.__version__}, {'bf16 autocast' if args.bf16 else 'fp32'}, SGD step included, "
        f"median of {args.iters} after {args.warmup} warm-up steps; ratios ÷ the float step of the same mode"
    )
    print(
        "| model | float eager ms | float compiled ms | W4A4 eager composite | W4A4 eager kernels | W4A4 compiled "
        "| W4A4 compiled, bits as data "
        "| 4-pass eager kernels ÷ eager float | 4-pass compiled ÷ compiled float | 4-pass compiled, bits as data "
        "÷ compiled float | compile s float / 4-pass / 4-pass bits as data (graphs) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(table_line(r))
    if any(k.endswith("_cg") for r in rows for k in r):
        print(
            "\nWith CUDA graphs (inductor's, as mode='reduce-overhead'), ratios ÷ the compiled float step with CUDA "
            "graphs (÷ without them in brackets)\n| model | float compiled ms | float, CUDA graphs ms | W4A4 "
            "| W4A4 bits as data | 4-pass | 4-pass bits as data |\n|---|---|---|---|---|---|---|"
        )
        for r in rows:
            print(cudagraph_line(r))


def table_line(r: dict) -> str:
    """One markdown row; '–' for a setting that was not run."""

    def ms(k: str) -> float:
        return r[k]["ms"] if k in r else float("nan")

    def ratio(k: str, base: str) -> str:
        return f"{ms(k) / ms(base):.2f}x" if k in r and base in r else "–"

    def comp(k: str, what: str) -> str:
        return f"{r[k][what]:.0f}" if k in r else "–"

    cols = [
        f"{ms('float'):.2f}",
        f"{ms('float_c'):.2f}",
        ratio("w4_composite", "float"),
        ratio("w4_kernels", "float"),
        ratio("w4_c", "float_c"),
        ratio("w4_data_c", "float_c"),
        ratio("multi_kernels", "float"),
        ratio("multi_c", "float_c"),
        ratio("multi_data_c", "float_c"),
        " / ".join(comp(k, "first_s") for k in ("float_c", "multi_c", "multi_data_c"))
        + f" ({' / '.join(comp(k, 'graphs') for k in ('float_c', 'multi_c', 'multi_data_c'))})",
    ]
    return f"| {r['model']} | " + " | ".join(cols) + " |"


def cudagraph_line(r: dict) -> str:
    """One markdown row of the CUDA-graph table; '–' for a setting that was not run."""

    def ms(k: str) -> str:
        return f"{r[k]['ms']:.2f}" if k in r else "–"

    def ratio(k: str) -> str:
        if k not in r or "float_cg" not in r:
            return "–"
        plain = f" ({r[k]['ms'] / r['float_c']['ms']:.2f}x)" if "float_c" in r else ""
        return f"{r[k]['ms'] / r['float_cg']['ms']:.2f}x{plain}"

    cols = [ms("float_c"), ms("float_cg")] + [ratio(k) for k in ("w4_cg", "w4_data_cg", "multi_cg", "multi_data_cg")]
    return f"| {r['model']} | " + " | ".join(cols) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated name@size:bBATCH")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=8, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation happens here)")
    ap.add_argument(
        "--backend", default="inductor", help="torch.compile backend behind the graph counter (aot_eager: CPU smoke)"
    )
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {','.join(SETTINGS)}")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="N", help="after timing, print each setting's N top kernels"
    )
    ap.add_argument("--fp32", dest="bf16", action="store_false", help="no bf16 autocast (default on CUDA: bf16)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=0,
        metavar="R",
        help="after the settings are measured, time them again in R interleaved rounds (fused kernels on or off "
        "as in their first run) and print each ratio with a 95%% CI over the rounds (R >= 2)",
    )
    args = ap.parse_args()
    if args.rounds == 1 or args.rounds < 0:
        ap.error(f"--rounds {args.rounds}: a confidence interval needs at least 2 rounds (0: no rounds)")
    args.settings = args.settings.split(",")
    if unknown := sorted(set(args.settings) - set(SETTINGS)):
        ap.error(f"unknown setting(s) {', '.join(unknown)}; accepted: {', '.join(SETTINGS)}")
    dev = torch.device(args.device)
    args.bf16 = args.bf16 and dev.type == "cuda"
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    rows = [row(spec, args, dev) for spec in args.models.split(",")]
    print_table(rows, args, dev)


if __name__ == "__main__":
    main()
