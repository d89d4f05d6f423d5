"""Training-step time: float step vs one quantized w8a8 pass vs the 4-pass multi-precision step (optimizer included).

Moved out of the former ``benchmarks/train_evidence.py`` (its accuracy evidence now lives in
``benchmarks/evidence.py``).  Eager and, on CUDA, ``torch.compile``; median of ``--iters`` after 3 warm-ups.

    python -m benchmarks.train_step_time --device cuda --model resnet20 --batch 256 --bf16
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import hasb
from hasb.models import build_model
from hasb.train import param_groups

BITS = [8, 6, 4, 2]


def log(msg: str) -> None:
    print(f"[train-step-time {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _median_ms(fn, iters: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after 3 warm-ups (synchronised on CUDA)."""
    ts = []
    for i in range(iters + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            ts.append(time.perf_counter() - t)
    ts.sort()
    return 1000 * ts[len(ts) // 2]


def step_times(
    model_name: str, device: torch.device, batch: int, bf16: bool, iters: int, compiled_multi: bool = False
) -> dict:
    """ms per optimizer step: float; one quantized 8-bit pass; the 4-pass multi-precision step. Eager and compiled."""
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    out = {}

    for compiled in (False, True):
        if compiled and device.type != "cuda":
            continue
        torch.manual_seed(0)
        fm = build_model(model_name).to(device).train()
        fopt = torch.optim.Adam(fm.parameters(), 1e-3)
        ffwd = torch.compile(fm) if compiled else fm

        qm = hasb.quantize_model(build_model(model_name)).to(device).train()
        hasb.init_quantizers(qm, x[:64])
        qopt = torch.optim.Adam(param_groups(qm, 5e-5), 1e-3)
        qfwd = torch.compile(qm) if compiled else qm

        def step(fwd, opt):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(fwd(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def one_pass(qm=qm, qfwd=qfwd, qopt=qopt):
            hasb.set_config(qm, 8)
            step(qfwd, qopt)

        def multi(qm=qm, qfwd=qfwd, qopt=qopt):
            for b in BITS:
                hasb.set_config(qm, b)
                step(qfwd, qopt)

        tag = "compiled" if compiled else "eager"
        with_multi = not compiled or compiled_multi
        for b in BITS if with_multi else [8]:  # compile each bit's graph before timing
            hasb.set_config(qm, b)
            step(qfwd, qopt)
        f = _median_ms(lambda ffwd=ffwd, fopt=fopt: step(ffwd, fopt), iters, device)
        q = _median_ms(one_pass, iters, device)
        m = _median_ms(multi, iters, device) if with_multi else float("nan")
        out[tag] = {"float_ms": f, "w8a8_pass_ms": q, "multi4_ms": m, "pass_ratio": q / f, "multi_ratio": m / f}
        log(f"step time {tag}: float {f:.2f} ms, one pass {q:.2f} ms ({q / f:.2f}x), 4-pass {m:.2f} ms ({m / f:.2f}x)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compiled-multi", action="store_true", help="also time the compiled 4-pass step")
    a = ap.parse_args(argv)
    res = step_times(a.model, torch.device(a.device), a.batch, a.bf16, a.iters, a.compiled_multi)
    print("| step time | float ms | one w8a8 pass | ratio | 4-pass multi step | ratio |")
    print("|---|---|---|---|---|---|")
    for tag, s in res.items():
        print(
            f"| {tag} | {s['float_ms']:.2f} | {s['w8a8_pass_ms']:.2f} | {s['pass_ratio']:.2f}x | "
            f"{s['multi4_ms']:.2f} | {s['multi_ratio']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
