"""``python -m search.pareto --budget 3.5``: the accuracy-vs-BitOPs front of a supernet and the best config in budget.

Pipeline (library: :func:`run_search`; the CLI only parses arguments):

1. Inputs: a trained supernet (``--checkpoint``, a ``model.pt`` from ``hasb.train`` or
   ``hasb.export.save_quantized``) and its sensitivity (``--sensitivity``, the
   analysis contract's ``sensitivity.json``).  Without them, a built-in demo
   (small_cnn on real Fashion-MNIST) is trained and analysed on first use and cached in ``--out``.
2. Budgets from ``hasb.CostModel``: ``--budget 3.5`` (average-bit equivalent), ``--budget 25GBOPs``,
   ``--size 1.2MB``, ``--avg-bits 3`` (the paper's plain average); all given budgets apply together.
3. Candidates: the exact ILP frontier of the Hessian proxy over a BitOPs sweep, the k best ILP configs at
   the budget, uniform configs, and an Optuna study (accuracy ↑, BitOPs ↓, seeded with the ILP/uniform configs).
4. Every candidate is evaluated on the validation split (BN re-calibrated per config, cached).
5. The non-dominated front of (BitOPs ↓, accuracy ↑), a plot (PNG + SVG), a table, and the most accurate
   config within the budget exported (``config.json`` + its integer checkpoint ``deploy.pt``).

Outputs in ``--out`` (default ``runs/demo``): pareto.png, pareto.svg, pareto.csv, candidates.csv,
config.json, deploy.pt; caches: evals.json (evaluations), optuna.db (the study).
Bad input: one line on stderr, exit status 2, nothing written.
"""
from __future__ import annotations

from hasb.errors import HasbError
import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from hasb.config import BitConfig, ConfigError, atomic_write_text
from hasb.cost import Budget, BudgetError, CostModel

from . import ilp

DEFAULT_OUT = "runs/demo"


class InputError(HasbError):
    """Bad command-line input (reported as one line, exit 2)."""


# ----------------------------------------------------------------------------------------------------------
# the front
def pareto_mask(bitops: Sequence[float], accuracy: Sequence[float]) -> np.ndarray:
    """Non-dominated points of (bitops ↓, accuracy ↑): [N] bool.

    A point is dominated when another has bitops ≤ and accuracy ≥ with at least one strict.
    Exact duplicates do not dominate each other (both stay on the front).
    """
    b = np.asarray(bitops, dtype=float)
    a = np.asarray(accuracy, dtype=float)
    n = len(b)
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    order = np.lexsort((-a, b))          # bitops ascending, accuracy descending
    best_cheaper = -np.inf                # best accuracy among strictly cheaper points
    i = 0
    while i < n:
        j = i
        while j < n and b[order[j]] == b[order[i]]:
            j += 1
        grp = order[i:j]
        top = a[grp].max()                # within equal bitops only the most accurate survive
        for k in grp:
            keep[k] = a[k] == top and a[k] > best_cheaper
        best_cheaper = max(best_cheaper, top)
        i = j
    return keep


def hypervolume(cost: Sequence[float], accuracy: Sequence[float], ref_cost: float, ref_accuracy: float) -> float:
    """Area dominated by (cost ↓, accuracy ↑) points inside [min cost, ref_cost] × [ref_accuracy, max]: a float.

    Points costlier than ``ref_cost`` or less accurate than ``ref_accuracy`` add nothing.  Units: cost units ×
    accuracy units (divide by the box's area to normalise).  Compares fronts found with equal evaluation budgets.
    """
    c = np.asarray(cost, dtype=float)
    a = np.asarray(accuracy, dtype=float)
    keep = (c <= ref_cost) & (a >= ref_accuracy)
    c, a = c[keep], a[keep]
    if len(c) == 0:
        return 0.0
    order = np.argsort(c, kind="stable")
    c, a = c[order], np.maximum.accumulate(a[order])     # best accuracy at cost ≤ c
    widths = np.diff(np.append(c, ref_cost))
    return float(np.sum(widths * (a - ref_accuracy)))


def pareto_front(df: pd.DataFrame, x: str = "bitops", y: str = "accuracy") -> pd.DataFrame:
    """Rows of ``df`` on the front, sorted by ``x``."""
    m = pareto_mask(df[x].to_numpy(), df[y].to_numpy())
    return df[m].sort_values(x).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# inputs
@dataclass
class Inputs:
    model: Any
    model_name: str
    cost: CostModel
    sensitivity: dict
    checkpoint: Optional[Path]
    checkpoint_sha: str
    data: str
    data_dir: Optional[str]
    val_size: int = 5000
    seed: int = 0
    demo: bool = False
    extra: dict = field(default_factory=dict)


def parse_budgets(cost: CostModel, budget: Optional[Sequence[str]], size: Optional[Sequence[str]],
                  avg_bits: Optional[Sequence[str]]) -> list[Budget]:
    """All budgets given on the command line, parsed by the CostModel (BudgetError on bad ones)."""
    out = []
    for t in budget or ():
        out.append(cost.parse_budget(t))
    for t in size or ():
        out.append(cost.parse_budget(t, "size"))
    for t in avg_bits or ():
        out.append(cost.parse_budget(t, "plain_avg"))
    if not out:
        raise InputError("no budget given: pass --budget 3.5 (average-bit equivalent), --budget 25GBOPs, "
                         "--size 1.2MB or --avg-bits 3")
    return out


def check_sensitivity(sens: Any, model_name: str, layers: Sequence[str], where: str) -> dict:
    """The contract checks the search relies on: same model, omega for every searchable layer."""
    if not isinstance(sens, dict) or not isinstance(sens.get("omega"), dict):
        raise InputError(f"{where} is not a sensitivity file (expected an object with an 'omega' object)")
    name = sens.get("model")
    if name is not None and str(name) != str(model_name):
        raise InputError(f"{where} is for model {name!r}, but the checkpoint is a {model_name!r}")
    missing = [n for n in layers if n not in sens["omega"]]
    if missing:
        raise InputError(f"{where} does not match the model's layers: no omega for {missing[0]!r} "
                         f"({len(missing)} of {len(layers)} searchable layers missing)")
    return sens


def load_sensitivity(path: Path) -> dict:
    """The validated sensitivity file (hasb.sensitivity_file is its one reader)."""
    from hasb.sensitivity_file import load_sensitivity as _load
    return _load(path)


def load_checkpoint(path: Path):
    """(model, extra) from a hasb export (``model.pt``) or a run directory containing one."""
    from hasb.export import CheckpointError, load_quantized
    p = path / "model.pt" if path.is_dir() else path
    if not p.is_file():
        raise InputError(f"checkpoint not found: {p}")
    try:
        return load_quantized(p)
    except (CheckpointError, ConfigError, KeyError, ValueError) as e:
        raise InputError(f"cannot load checkpoint {p}: {str(e).splitlines()[0]}") from None


def resolve_inputs(args, validate_only: bool = False) -> Inputs:
    """Model, cost model, sensitivity and data for the run (the demo when no checkpoint is given)."""
    from hasb.models import MODELS, UnknownModelError
    from .evaluate import file_digest
    if args.model is not None and ":" not in args.model and args.model not in MODELS:
        raise UnknownModelError(f"unknown model {args.model!r}; accepted: {', '.join(MODELS)} or package.module:callable")
    if args.checkpoint is None:
        if args.sensitivity is not None:
            raise InputError("--sensitivity needs --checkpoint (the supernet it was computed for)")
        if args.model not in (None, "small_cnn"):
            raise InputError(f"--model {args.model} needs --checkpoint (a trained supernet); without one the "
                             "built-in demo (small_cnn on Fashion-MNIST) runs")
        from . import demo
        return demo.demo_inputs(args, validate_only=validate_only)
    ck = Path(args.checkpoint)
    model, extra = load_checkpoint(ck)
    build = getattr(model, "hasb_build", None) or {}
    name = build.get("name", "?")
    if args.model is not None and args.model != name:
        raise InputError(f"checkpoint {ck} is a {name!r} model, not --model {args.model!r}")
    ck_file = ck / "model.pt" if ck.is_dir() else ck
    sens_path = Path(args.sensitivity) if args.sensitivity else ck_file.parent / "sensitivity.json"
    if args.sensitivity is None and not sens_path.is_file():
        raise InputError(f"no sensitivity given and none next to the checkpoint ({sens_path}); pass --sensitivity "
                         "(from: python -m analysis.sensitivity)")
    from hasb.quantize import searchable_layers
    layers = searchable_layers(model)
    if not layers:
        raise InputError("empty search space: the model has no searchable layer")
    sens = check_sensitivity(load_sensitivity(sens_path), name, layers, str(sens_path))
    cost = CostModel.from_model(model)
    tc = extra.get("train_config") or {}
    if isinstance(tc, str):
        try:
            tc = json.loads(tc)
        except json.JSONDecodeError:
            tc = {}
    return Inputs(model=model, model_name=name, cost=cost, sensitivity=sens, checkpoint=ck_file,
                  checkpoint_sha=file_digest(ck_file), data=args.data or tc.get("data") or "fashion-mnist",
                  data_dir=args.data_dir or tc.get("data_dir"), val_size=int(tc.get("val_size") or 5000),
                  seed=int(tc.get("seed") or 0), extra=extra)


# ----------------------------------------------------------------------------------------------------------
# the search
def _constraint_rows(space, budgets):
    return [ilp.constraint_from_budget(b) for b in budgets]


def budget_binds(space: ilp.SearchSpace, cons: Sequence[ilp.Constraint]) -> bool:
    return any(space.metric_range(c.metric)[1] > c.limit * (1 + 1e-12) or c.equality for c in cons)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_search(args, inputs: Inputs, budgets: list[Budget], out: Path) -> dict:
    """Everything after input validation; returns the summary dict (also written as files)."""
    from .evaluate import Evaluator
    from hasb.quantize import get_spec
    quiet = args.quiet
    t0 = time.perf_counter()
    model, cost = inputs.model, inputs.cost
    groups = ilp.tied_groups(model) if not args.no_tie else []
    space = ilp.build_space(cost, sensitivity=inputs.sensitivity, objective=args.objective,
                            tied_wa=not args.untied, groups=groups)
    cons = _constraint_rows(space, budgets)
    binds = budget_binds(space, cons)

    # ILP: the exact proxy frontier over a BitOPs sweep, and k-best at the budget (all constraints)
    sweep = ilp.sweep(space, ilp.budget_grid(space, args.sweep), "bitops")
    at_budget = ilp.k_best(space, cons, args.k_best)
    unif = ilp.uniform_choices(space)

    def splits():
        from hasb.data import load_dataset
        s = load_dataset(inputs.data, inputs.data_dir, val_size=inputs.val_size, seed=inputs.seed,
                         val_limit=args.val_limit, calib_size=args.calib_size)
        return s.val, s.calib

    ctx = {"checkpoint": inputs.checkpoint_sha, "data": inputs.data, "val_size": inputs.val_size,
           "val_limit": args.val_limit, "seed": inputs.seed,
           "calib_size": args.calib_size}
    cache = out / "evals.json"
    if args.force and cache.exists():
        cache.unlink()
    ev = Evaluator(model, splits, bn=args.bn, batch_size=args.batch_size, cache_path=cache, context=ctx,
                   device=args.device)

    rows: list[dict] = []

    def add(uc, source, **extra):
        r = ilp._row(space, np.asarray(uc), source=source, **extra)
        rows.append(r)

    for _, r in sweep.iterrows():
        add(r.unit_choice, "ilp", budget=r.budget, rank=0)
    for s in at_budget:
        add(s.unit_choice, "ilp", budget=cons[0].limit, rank=s.rank)
    for bit, uc in unif:
        add(uc, "uniform", label=f"w{bit}a{bit}")
    configs = {r["digest"]: space.config(r["unit_choice"]) for r in rows}
    _log(f"[search] {space.n_units} units × {len(space.choices)} choices; ILP: {len(sweep)} frontier configs, "
         f"{len(at_budget)} at the budget; evaluating {len(configs)} configs "
         f"({sum(ev.cached(c) is None for c in configs.values())} new)", quiet)
    ev.evaluate_many(list(configs.values()), progress=not quiet, desc="evaluate")

    if not args.no_optuna and args.trials > 0:
        from .optuna_search import run_study, study_trials_frame
        seeds = [s.unit_choice for s in at_budget] + [uc for _, uc in unif]
        bkey = "_".join(f"{b.kind}{b.limit if b.kind != 'plain_avg' else b.value:.6g}" for b in budgets)
        import hashlib
        # the study's parameters are the space's units and choices: a different space is a different study
        skey = hashlib.sha1(json.dumps([space.unit_names(), space.choices, space.objective_name]).encode()
                            ).hexdigest()[:8]
        study_name = f"hasb-{inputs.model_name}-{ev.context_key}-{skey}-{bkey}-{args.sampler}-s{args.seed}"
        if args.force and args.storage is None and (out / "optuna.db").exists():
            import optuna
            try:
                optuna.delete_study(study_name=study_name, storage=f"sqlite:///{(out / 'optuna.db').resolve()}")
            except KeyError:
                pass

        def fn(cfg):
            r = ev.evaluate(cfg)
            return r.accuracy, r.loss
        _log(f"[search] Optuna study {study_name!r}: {args.trials} trials ({args.sampler})", quiet)
        study = run_study(space, fn, constraints=cons, storage=args.storage, out_dir=out, study_name=study_name,
                          n_trials=args.trials, sampler=args.sampler, seed=args.seed, seeds=seeds,
                          progress=not quiet)
        tf = study_trials_frame(study, space)
        for _, t in tf.iterrows():
            add(t.unit_choice, "optuna", trial=int(t.trial))
            configs.setdefault(rows[-1]["digest"], space.config(t.unit_choice))

    # candidates: every (config, source) row with its evaluation
    cand = pd.DataFrame(rows)
    res = {d: ev.evaluate(c, save=False) for d, c in configs.items()}
    ev._save_cache()
    cand["accuracy"] = [res[d].accuracy for d in cand.digest]
    cand["loss"] = [res[d].loss for d in cand.digest]
    cand["feasible"] = [all(c.holds(row[c.metric]) for c in cons) for _, row in cand.iterrows()]
    cand.insert(0, "config_id", cand["digest"].str[:10])

    # pareto.csv: one row per distinct config (first source wins: uniform labels are kept), with on_front
    prio = {"uniform": 0, "ilp": 1, "optuna": 2}
    uniq = (cand.assign(_p=cand.source.map(prio)).sort_values(["_p"]).drop_duplicates("digest")
            .drop(columns="_p"))
    uniq["sources"] = [",".join(sorted(set(cand.source[cand.digest == d]))) for d in uniq.digest]
    uniq["on_front"] = pareto_mask(uniq.bitops.to_numpy(), uniq.accuracy.to_numpy())
    uniq = uniq.sort_values("bitops").reset_index(drop=True)

    feas = uniq[uniq.feasible]
    if feas.empty:   # cannot happen: the ILP optimum at the budget is feasible
        raise ilp.InfeasibleError("no evaluated config meets the budget")
    best = feas.sort_values(["accuracy", "bitops", "objective"], ascending=[False, True, True]).iloc[0]
    chosen_cfg = configs[best.digest]

    # ------------------------------------------------------------------ outputs (each atomic, all at the end)
    from .export import export_integer, make_document, write
    import hasb
    spec = get_spec(model)
    metrics = {k: float(best[k]) for k in ("bitops", "gbitops", "size_bytes", "avg_bit_equivalent",
                                           "plain_avg_bits", "accuracy", "loss")}
    out.mkdir(parents=True, exist_ok=True)
    with ev.calibrated(chosen_cfg) as scored:   # the BN statistics the score used, not the stored ones
        deploy = export_integer(scored, chosen_cfg, out / "deploy.pt",
                                extra={"source": "search.pareto", "metrics": metrics})
    doc = make_document(
        model_name=inputs.model_name, build=getattr(model, "hasb_build", None), bits=spec.bits, config=chosen_cfg,
        fixed={n: ("fp" if spec.fixed_bit is None else spec.fixed_bit) for n in spec.fixed}, metrics=metrics,
        budgets=budgets, budget_binds=binds, source=str(best.source),
        provenance={"sensitivity_fingerprint": inputs.sensitivity.get("fingerprint"),
                    "checkpoint_sha256": inputs.checkpoint_sha, "hasb_version": hasb.__version__,
                    "command": args.command, "demo": inputs.demo, "objective": space.objective_name,
                    "bn": args.bn, "data": inputs.data},
        integer_checkpoint=deploy.name if deploy is not None else None)
    write(doc, out / "config.json")
    cols = ["config_id", "bitops", "gbitops", "avg_bit_equivalent", "size_bytes", "plain_avg_bits", "accuracy",
            "loss", "source", "sources", "on_front", "feasible", "objective", "label", "config", "digest"]
    for c in cols:
        if c not in uniq:
            uniq[c] = np.nan
    atomic_write_text(out / "pareto.csv", uniq[cols].to_csv(index=False))
    ccols = [c for c in ["config_id", "source", "budget", "rank", "trial", "label", "bitops", "gbitops",
                         "avg_bit_equivalent", "size_bytes", "plain_avg_bits", "objective", "accuracy", "loss",
                         "feasible", "config", "digest"] if c in cand]
    atomic_write_text(out / "candidates.csv", cand[ccols].to_csv(index=False))
    png, svg = plot(uniq, best, budgets, cost, out, inputs.model_name)

    summary = {
        "model": inputs.model_name, "demo": inputs.demo,
        "budget": [b.text for b in budgets], "budget_binds": binds,
        "chosen": {"config_id": best.config_id, "config": best.config, "source": best.source,
                   "bitops": metrics["bitops"], "gbitops": metrics["gbitops"],
                   "avg_bit_equivalent": metrics["avg_bit_equivalent"], "size_bytes": metrics["size_bytes"],
                   "accuracy": metrics["accuracy"], "loss": metrics["loss"]},
        "n_candidates": int(len(uniq)), "n_front": int(uniq.on_front.sum()),
        "n_evaluated_now": ev.n_evaluated,
        "paths": {"plot_png": str(png), "plot_svg": str(svg), "pareto_csv": str(out / "pareto.csv"),
                  "candidates_csv": str(out / "candidates.csv"), "config": str(out / "config.json"),
                  "integer_checkpoint": str(deploy) if deploy is not None else None},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if not binds:
        summary["note"] = "the budget does not bind: every config fits; picked the most accurate config overall"
    print_table(uniq, best, budgets, binds, summary, file=sys.stderr if args.json else sys.stdout, quiet=quiet)
    return summary


def plot(uniq: pd.DataFrame, best, budgets: Sequence[Budget], cost: CostModel, out: Path, model_name: str):
    """pareto.png + pareto.svg via reports.plots.plot_pareto."""
    from reports.plots import plot_pareto, save_figure   # the project's one home for figures
    bud = [b.limit for b in budgets if b.kind in ("avg_bits", "bitops")]
    chosen = {"accuracy": float(best.accuracy), "gbitops": float(best.gbitops), "label": "chosen"}
    short = {"avg_bits": "avg-bit ≤ {v:g}", "bitops": "≤ {g:.3g} GBitOPs", "size": "size ≤ {m:.3g} MB",
             "plain_avg": "plain avg bit ≤ {v:g}"}
    title = f"{model_name}: accuracy vs BitOPs (budget: " + ", ".join(
        short[b.kind].format(v=b.value, g=b.limit / 1e9, m=b.limit / 1e6) for b in budgets) + ")"
    fig = plot_pareto(uniq, chosen=chosen, budget_bitops=min(bud) if bud else None, avg_bits_fn=cost, title=title)
    paths = save_figure(fig, [out / "pareto.png", out / "pareto.svg"])
    return paths[0], paths[1]


def print_table(uniq: pd.DataFrame, best, budgets, binds: bool, summary: dict, file=sys.stdout,
                quiet: bool = False) -> None:
    front = uniq[uniq.on_front | (uniq.source == "uniform") | (uniq.digest == best.digest)]
    lines = [f"{'':1} {'config_id':10}  {'source':8} {'GBitOPs':>9} {'avg-bit':>7} {'size kB':>8} "
             f"{'acc %':>6} {'loss':>6}  {'front':5} {'fits':4}  config"]
    for _, r in front.iterrows():
        mark = "*" if r.digest == best.digest else " "
        src = r.label if isinstance(r.get("label"), str) else r.source
        lines.append(f"{mark} {r.config_id:10}  {src:8} {r.gbitops:9.4f} {r.avg_bit_equivalent:7.3f} "
                     f"{r.size_bytes / 1e3:8.1f} {100 * r.accuracy:6.2f} {r.loss:6.3f}  "
                     f"{'yes' if r.on_front else '':5} {'yes' if r.feasible else '':4}  {r.config}")
    c = summary["chosen"]
    lines.append("")
    lines.append(f"budget: {'; '.join(b.describe() for b in budgets)}"
                 + ("" if binds else "  (does not bind: every config fits)"))
    lines.append(f"chosen (*): {c['config']}  {c['gbitops']:.4g} GBitOPs, average-bit equivalent "
                 f"{c['avg_bit_equivalent']:.3f}, {c['size_bytes'] / 1e3:.1f} kB, accuracy {100 * c['accuracy']:.2f}% "
                 f"[{c['source']}]")
    p = summary["paths"]
    lines.append(f"plot:   {p['plot_png']}  (+ {Path(p['plot_svg']).name})")
    lines.append(f"config: {p['config']}" + (f"  integer checkpoint: {p['integer_checkpoint']}"
                                             if p["integer_checkpoint"] else ""))
    lines.append(f"table:  {p['pareto_csv']}  (all candidates: {Path(p['candidates_csv']).name})")
    if quiet:
        lines = lines[-5:]
    print("\n".join(lines), file=file, flush=True)


# ----------------------------------------------------------------------------------------------------------
# CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m search.pareto",
        description="Search per-layer bits of a trained supernet under BitOPs/size budgets; plot the accuracy-vs-"
                    "BitOPs front and export the most accurate config in budget. Without --checkpoint a built-in "
                    "demo (small_cnn on Fashion-MNIST) is trained on first use and cached in --out.")
    p.add_argument("--budget", action="append", help="average-bit equivalent (3.5) or BitOPs (25GBOPs, 2.5e10); "
                   "repeatable; all budgets apply")
    p.add_argument("--size", action="append", help="model size budget, e.g. 1.2MB, 300kB (bare number = MB)")
    p.add_argument("--avg-bits", action="append", help="the paper's plain (unweighted) average bit budget, e.g. 3")
    p.add_argument("--model", help="zoo model name (checked against the checkpoint)")
    p.add_argument("--checkpoint", help="supernet model.pt (hasb.train / hasb.export) or its run directory")
    p.add_argument("--sensitivity", help="sensitivity.json (default: next to the checkpoint)")
    p.add_argument("--data", default=None, help="dataset name (default: the checkpoint's training data, "
                   "else fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's IDX files")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"run directory (default {DEFAULT_OUT})")
    p.add_argument("--trials", type=int, default=None,
                   help="Optuna trials (COMPLETE trials in the study; default 40, demo 24)")
    p.add_argument("--storage", default=None, help="Optuna storage: default SQLite in --out; postgresql://..., "
                   "sqlite:///FILE or journal:FILE to share one study between workers")
    p.add_argument("--sampler", default="tpe", choices=("nsga2", "tpe"),
                   help="Optuna sampler (default tpe: measured better than NSGA-II, see search.optuna_search)")
    p.add_argument("--k-best", type=int, default=3, help="ILP alternatives at the budget (default 3)")
    p.add_argument("--sweep", type=int, default=None, help="budgets in the ILP frontier sweep (default 40, demo 20)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--no-optuna", action="store_true", help="ILP and uniform configs only")
    p.add_argument("--force", action="store_true", help="discard cached evaluations and this budget's Optuna study")
    p.add_argument("--objective", default="omega", choices=("omega", "paper"),
                   help="ILP objective: min Σ Ω (default) or the paper's max Σ t·b")
    p.add_argument("--untied", action="store_true", help="search weight and activation bits separately")
    p.add_argument("--no-tie", action="store_true", help="do not tie residual shortcut convs to their block")
    p.add_argument("--bn", default="recal", choices=("recal", "stored"),
                   help="BN statistics per config: re-calibrated (default) or stored (TBN/per-bit)")
    p.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size")
    p.add_argument("--val-limit", type=int, default=None,
                   help="evaluate on the first N validation images only (default all; demo 2000)")
    p.add_argument("--calib-size", type=int, default=None, help="BN re-calibration images (default 1024, demo 512)")
    p.add_argument("--device", default="cpu", help="evaluation device (cpu, cuda)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--quiet", action="store_true", help="less output")
    return p


def _positive(name: str, v: Optional[int], allow_zero: bool = False) -> None:
    if v is not None and (v < 0 or (v == 0 and not allow_zero)):
        raise InputError(f"--{name} must be {'≥ 0' if allow_zero else 'positive'}, got {v}")


def user_errors() -> tuple:
    from hasb.data import DataError
    from hasb.models import UnknownModelError
    errs = [InputError, BudgetError, ConfigError, ilp.SearchError, DataError, UnknownModelError]
    try:
        from hasb.export import CheckpointError
        errs.append(CheckpointError)
    except ImportError:   # pragma: no cover
        pass
    for mod, name in (("hasb.train", "TrainError"), ("hasb.sampler", "SensitivityError"),
                      ("analysis.sensitivity", "SensitivityError")):
        try:   # errors of the demo pipeline's own stages: reported as one line too
            errs.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    from .export import ExportError
    from .optuna_search import StorageError
    errs += [ExportError, StorageError]
    try:
        from .demo import DemoError
        errs.append(DemoError)
    except ImportError:   # pragma: no cover
        pass
    return tuple(errs)


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse, validate (nothing written on bad input), search; returns the summary."""
    args = build_parser().parse_args(argv)
    demo = args.checkpoint is None
    # the demo trades a little precision (val 2000: accuracy s.e. ≈ 0.8 pt) for its 3-minute first run
    for k, user, dem in (("trials", 40, 24), ("sweep", 40, 20), ("calib_size", 1024, 512)):
        if getattr(args, k) is None:
            setattr(args, k, dem if demo else user)
    if args.val_limit is None and demo:
        args.val_limit = 2000
    args.command = "python -m search.pareto " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                 else sys.argv[1:]))
    _positive("trials", args.trials, allow_zero=True)
    _positive("k-best", args.k_best)
    _positive("sweep", args.sweep)
    _positive("batch-size", args.batch_size)
    _positive("val-limit", args.val_limit)
    _positive("calib-size", args.calib_size)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    # validation first (cheap: an untrained demo model is enough for costs), then the expensive parts
    pre = resolve_inputs(args, validate_only=True)
    budgets = parse_budgets(pre.cost, args.budget, args.size, args.avg_bits)
    space = ilp.build_space(pre.cost, sensitivity=pre.sensitivity if pre.sensitivity else None,
                            objective=args.objective if pre.sensitivity else np.zeros(
                                (len(pre.cost.names), len(pre.cost.candidate_bits) ** (2 if args.untied else 1))),
                            tied_wa=not args.untied, groups=ilp.tied_groups(pre.model) if not args.no_tie else [])
    ilp.solve(space, budgets)            # InfeasibleError (with the feasible range) for a combination
    inputs = pre if not pre.demo else resolve_inputs(args)
    return run_search(args, inputs, budgets, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        summary = run(argv)
    except user_errors() as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed evaluations and Optuna trials are kept; run the same command to resume",
              file=sys.stderr)
        return 130
    if "--json" in (argv if argv is not None else sys.argv[1:]):
        print(json.dumps(summary, indent=2))
    elif summary.get("note"):
        print(summary["note"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
