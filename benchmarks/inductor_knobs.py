"""One compiled hasb step under inductor config knobs, side by side in one process, with 95% CIs (issue 15).

Why: on the H200 the compiled W4A4 ResNet-18@224 step spends 1.58 ms per step in one kernel, the activation step's
gradient sum of layer 1 (``triton_per_fused_..._sum_threshold_backward_where``, about 20x its memory traffic;
benchmarks/RESULTS.md, session 9), and two rewrites of the math moved that sum without a measurable gain.  This
asks whether inductor's own choices for it are the cause: each knob compiles the same model and setting with
that inductor config patched in, then all of them are timed in interleaved rounds and each is divided by the
default compile, per round, with a 95% t-interval.  ``--dump DIR`` copies the generated source of every kernel
named in ``--kernel`` (a name prefix, from ``quant_overhead --profile``) for each knob.

GPU:  python -m benchmarks.inductor_knobs --model resnet18@224:b256 --setting w4_cg --rounds 5 --dump $OUT/kernels
CPU:  python -m benchmarks.inductor_knobs --device cpu --model small_cnn@28:b8 --backend aot_eager  (smoke)
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
from pathlib import Path

import torch

import hasb
from benchmarks import quant_overhead as QO

# name → inductor config patch (keys as torch._inductor.config spells them; a knob this torch lacks is reported)
KNOBS: dict[str, dict] = {
    "default": {},
    "looped": {"triton.persistent_reductions": False},  # the slow kernel is a persistent ("per") reduction
    "multi_kernel": {"triton.multi_kernel": 1},  # persistent and looped variants, the faster picked at run time
    "coordinate": {"coordinate_descent_tuning": True},  # block sizes tuned per kernel (longer compile)
    "tile": {"triton.tile_reductions": True},
    "cooperative": {"triton.cooperative_reductions": True},
}


def known(patch: dict) -> bool:
    """Whether every key of ``patch`` exists in this torch's inductor config."""
    import torch._inductor.config as cfg

    for key in patch:
        node = cfg
        for part in key.split("."):
            if not hasattr(node, part):
                return False
            node = getattr(node, part)
    return True


def dump_kernels(part: str, dest: Path, seen: set[Path]) -> int:
    """Copy every generated source file in inductor's cache that defines a Triton kernel whose name contains
    ``part`` (persistent ``triton_per_`` or looped ``triton_red_`` alike) and is not in ``seen`` (an earlier
    knob's) to ``dest``; returns how many.  ``seen`` gets every file looked at."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted(set(Path(cache_dir()).rglob("*.py")) - seen):
        seen.add(f)
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if re.search(rf"def triton_\w*{re.escape(part)}", text):
            shutil.copy(f, dest / f.name)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18@224:b256", help="name@size:bBATCH")
    ap.add_argument("--setting", default="w4_cg", help=f"a compiled setting of quant_overhead ({', '.join(QO.PLAN)})")
    ap.add_argument("--knobs", default=",".join(KNOBS), help=f"comma-separated subset of {', '.join(KNOBS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="inductor", help="aot_eager: a CPU smoke run (the knobs then do nothing)")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (>= 2)")
    ap.add_argument("--dump", default=None, help="folder for the generated source of the --kernel kernels")
    ap.add_argument(
        "--kernel",
        default="fused_add_clamp_div_ge_le_logical_and_mul_neg_permute_round_sub_sum",
        help="part of the name of the Triton kernels to dump (default: the activation step's gradient sum)",
    )
    args = ap.parse_args()
    knobs = args.knobs.split(",")
    if bad := [k for k in knobs if k not in KNOBS]:
        ap.error(f"unknown knob(s) {', '.join(bad)}; accepted: {', '.join(KNOBS)}")
    if args.setting not in QO.PLAN or not QO.PLAN[args.setting][2]:
        ap.error(
            f"--setting {args.setting}: not a compiled setting; accepted: "
            + ", ".join(k for k, v in QO.PLAN.items() if v[2])
        )
    if args.rounds < 2:
        ap.error(f"--rounds {args.rounds}: a confidence interval needs at least 2 rounds")
    run(args, knobs)


def run(args, knobs: list[str]) -> None:
    """Compile and time the setting once per knob, then the interleaved rounds and the table."""
    dev = torch.device(args.device)
    args.bf16, args.profile = dev.type == "cuda", 0
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    name, size, batch = QO.parse_model(args.model)
    fmodel, x, y, loss_fn = QO.make(name, size, batch, dev)
    qmodel = hasb.quantize_model(copy.deepcopy(fmodel), bits=(8, 6, 4, 2), example_input=x[:2])
    hasb.init_quantizers(qmodel, x[:8])
    qmodel.train()
    weights, bits, _, _ = QO.PLAN[args.setting]
    steps: dict[str, tuple] = {}
    seen: set[Path] = set()
    with torch._dynamo.config.patch(recompile_limit=64):  # every knob's graphs stay cached on the same code
        for knob in knobs:
            if not known(KNOBS[knob]):
                print(f"{knob}: not in this torch's inductor config, skipped", flush=True)
                continue
            model = copy.deepcopy(qmodel) if weights == "int" else hasb.bits_as_data(copy.deepcopy(qmodel))
            hasb.set_config(model, 4)
            r = QO.measure(model, x, y, loss_fn, bits, args, dev, True, args.setting, patches=KNOBS[knob])
            steps[knob] = QO.STEPS.pop(args.setting)
            print(f"{knob}: {r}", flush=True)
            if args.dump:
                print(f"  {dump_kernels(args.kernel, Path(args.dump) / knob, seen)} source file(s) dumped", flush=True)
        per = QO.interleaved(args.rounds, args.iters, dev, steps=steps, prepare=_w4a4)
    QO.print_rounds(f"{args.model} {args.setting}, rounds of {args.iters} steps", per, base=lambda k: "default")


def _w4a4(knob: str, model, bits) -> None:
    if bits == [None]:  # one W4A4 pass per step: the config the setting is defined by
        hasb.set_config(model, 4)


if __name__ == "__main__":
    main()
