"""Search benchmarks: ILP frontier sweep, sub-net evaluations per minute, front-door wall times, Optuna samplers.

    python benchmarks/search.py                       # all parts on CPU
    python benchmarks/search.py --only ilp,evals --device cuda
    python benchmarks/search.py --only samplers       # NSGA-II vs TPE (the default sampler's evidence)

Prints a Markdown table (paste into benchmarks/RESULTS.md).  Parts:

* ``ilp``: ResNet-50 at 224 px (hasb.CostModel; 52 searchable layers, residual shortcuts tied → 48 units × 4
  bits), random Ω; the exact frontier (Nemhauser–Ullmann) and a 100-budget sweep with it, plus the same sweep
  by one MILP per budget (HiGHS) for reference.  Median of ``--repeat`` runs.
* ``evals``: ResNet-20 supernet (``--checkpoint``, else an untrained quantized ResNet-20) on the Fashion-MNIST
  validation split (5000 images): BN re-calibration on 1024 images + full validation per config.
* ``frontdoor``: ``python -m search.pareto --budget 3.5 --out <tmp>`` cold (builds the demo) then warm.
* ``samplers``: NSGA-II vs TPE on the ResNet-20 space with a noisy proxy accuracy; hypervolume of the
  feasible front after the same seeds, mean ± standard error over seeds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_ilp(repeat: int = 5, n_budgets: int = 100) -> list[tuple[str, str]]:
    import hasb
    from hasb.models import build_model
    from search import ilp

    m = hasb.quantize_model(build_model("resnet50", num_classes=1000, in_channels=3, image_size=224))
    cm = hasb.CostModel.from_model(m)
    rng = np.random.default_rng(0)
    om = {n: {str(b): float(rng.lognormal(0, 2)) * 4.0**-b for b in cm.candidate_bits} for n in cm.names}
    t = time.perf_counter()
    space = ilp.build_space(cm, sensitivity={"omega": om}, groups=ilp.tied_groups(m))
    t_build = time.perf_counter() - t
    grid = ilp.budget_grid(space, n_budgets)
    times, n_front, n_rows = [], 0, 0
    for _ in range(repeat):
        t = time.perf_counter()
        fr = ilp.frontier(space)
        df = ilp.sweep(space, grid, method="frontier")
        times.append(time.perf_counter() - t)
        n_front, n_rows = len(fr), len(df)
    t = time.perf_counter()
    dm = ilp.sweep(space, grid, method="milp")
    t_milp = time.perf_counter() - t
    same = np.allclose(df.set_index("budget").objective.sort_index(), dm.set_index("budget").objective.sort_index())
    t = time.perf_counter()
    ilp.k_best(space, [ilp.Constraint("bitops", grid[n_budgets // 2])], 10)
    t_kb = time.perf_counter() - t
    return [
        (
            "ILP space build, ResNet-50 @224 (CostModel → arrays)",
            f"{t_build * 1e3:.0f} ms ({len(cm.names)} layers, {space.n_units} units × {len(space.choices)} bits)",
        ),
        (
            f"ILP exact frontier + {n_budgets}-budget sweep (median of {repeat})",
            f"{np.median(times) * 1e3:.0f} ms ({n_front} frontier points, {n_rows} distinct configs)",
        ),
        ("same sweep, one MILP per budget (HiGHS, gap 0)", f"{t_milp:.2f} s (objectives identical: {same})"),
        ("10-best at one budget (no-good cuts)", f"{t_kb * 1e3:.0f} ms"),
    ]


def bench_evals(device: str = "cpu", n: int = 4, checkpoint: str | None = None) -> list[tuple[str, str]]:
    import torch

    import hasb
    from hasb.data import load_dataset
    from hasb.models import build_model
    from search.evaluate import Evaluator

    if checkpoint:
        model, _ = hasb.export.load_quantized(checkpoint)
        what = f"ResNet-20 supernet {checkpoint}"
    else:
        model = hasb.quantize_model(build_model("resnet20"))
        what = "ResNet-20 (untrained, same compute)"
    s = load_dataset("fashion-mnist")
    model.to(device)
    hasb.init_quantizers(model, s.calib[0][:256].to(device))
    ev = Evaluator(model, (s.val, s.calib), device=device, batch_size=500)
    rng = np.random.default_rng(0)
    names = hasb.searchable_layers(model)
    cfgs = [hasb.BitConfig({nm: int(rng.choice([8, 6, 4, 2])) for nm in names}) for _ in range(n + 1)]
    ev.evaluate(cfgs[0])  # warm-up (allocator, kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for c in cfgs[1:]:
        ev.evaluate(c)
    dt = (time.perf_counter() - t) / n
    return [
        (
            f"sub-net evaluation, {what}, {device} ({torch.get_num_threads()} threads): BN recal 1024 + val 5000",
            f"{dt:.2f} s/config = {60 / dt:.1f} configs/min",
        )
    ]


def bench_frontdoor() -> list[tuple[str, str]]:
    out = Path(tempfile.mkdtemp(prefix="hasb-frontdoor-"))
    rows = []
    for label in ("cold (trains + analyses the demo)", "warm (all cached)"):
        t = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "search.pareto", "--budget", "3.5", "--out", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        dt = time.perf_counter() - t
        if r.returncode != 0:
            rows.append((f"front door {label}", f"FAILED: {r.stderr.strip().splitlines()[-1] if r.stderr else ''}"))
            break
        rows.append((f"front door `python -m search.pareto --budget 3.5` {label}", f"{dt:.1f} s"))
    return rows


def bench_samplers(n_trials: int = 80, n_seeds: int = 5) -> list[tuple[str, str]]:
    import hasb
    from hasb.models import build_model
    from search import ilp
    from tests.support.fakes import fake_sensitivity

    m = hasb.quantize_model(build_model("resnet20"))
    cm = hasb.CostModel.from_model(m)
    space = ilp.build_space(cm, sensitivity=fake_sensitivity(m, 0), groups=ilp.tied_groups(m))
    budget = cm.parse_budget("3.5")
    cons = [ilp.constraint_from_budget(budget)]
    seeds = [s.unit_choice for s in ilp.k_best(space, cons, 3)] + [uc for _, uc in ilp.uniform_choices(space)]
    out = []
    for sampler in ("nsga2", "tpe"):
        runs = [_sampler_run(space, cm, budget, cons, seeds, sampler, seed, n_trials) for seed in range(n_seeds)]
        hvs, ms = np.array([hv for hv, _ in runs]), [t for _, t in runs]
        out.append(
            (
                f"Optuna {sampler}: normalised hypervolume after {n_trials} trials "
                f"(ResNet-20 space, budget 3.5, {n_seeds} seeds)",
                f"{hvs.mean():.4f} ± {hvs.std(ddof=1) / np.sqrt(len(hvs)):.4f} (s.e.), "
                f"{np.mean(ms):.1f} ms/trial incl. proxy",
            )
        )
    return out


def _sampler_run(space, cm, budget, cons, seeds, sampler: str, seed: int, n_trials: int) -> tuple[float, float]:
    """One seeded Optuna study on a noisy proxy accuracy: (normalised hypervolume, ms per trial)."""
    import optuna

    from search import ilp
    from search.optuna_search import run_study
    from search.pareto import hypervolume

    scale = space.evaluate(ilp.uniform_choices(space)[-1][1])["objective"]  # Ω of all-2-bit
    rng = np.random.default_rng(1000 + seed)

    def fn(cfg):
        o = space.evaluate(space.unit_choice_of(cfg))["objective"]
        # proxy accuracy in [0, 1]: less perturbation → higher, plus evaluation noise (s.d. 0.005)
        return float(np.exp(-3 * o / scale) + rng.normal(0, 0.005)), 0.0

    t = time.perf_counter()
    st = run_study(
        space,
        fn,
        constraints=cons,
        storage=optuna.storages.InMemoryStorage(),
        study_name="b",
        n_trials=n_trials,
        sampler=sampler,
        seed=seed,
        seeds=seeds,
    )
    ms = (time.perf_counter() - t) / n_trials * 1e3
    feasible = [t for t in st.get_trials() if t.values and all(c <= 0 for c in t.user_attrs["constraint"])]
    pts = np.array([[t.values[1], t.values[0]] for t in feasible])
    lo = cm.uniform_bitops(2) / 1e9
    return hypervolume(pts[:, 0], pts[:, 1], budget.limit / 1e9, 0.0) / ((budget.limit / 1e9 - lo) * 1.0), ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="ilp,evals,frontdoor", help="comma list of: ilp, evals, frontdoor, samplers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", default=None, help="ResNet-20 supernet model.pt for the evals part")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sampler-trials", type=int, nargs="+", default=[40, 80])
    a = ap.parse_args()
    parts = a.only.split(",")
    rows = []
    if "ilp" in parts:
        rows += bench_ilp(a.repeat)
    if "evals" in parts:
        rows += bench_evals(a.device, checkpoint=a.checkpoint)
    if "frontdoor" in parts:
        rows += bench_frontdoor()
    if "samplers" in parts:
        for n in a.sampler_trials:
            rows += bench_samplers(n)
    print(f"\nsearch benchmarks — {os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}\n")
    print("| measurement | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
