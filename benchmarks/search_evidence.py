"""Evidence for issue 5 on a trained supernet: ILP-proxy vs Optuna vs ILP-seeded Optuna, and the pick at a budget.

    python benchmarks/search_evidence.py --checkpoint RUN/super_432/model.pt --sensitivity RUN/sens_432/sensitivity.json \
        --budget 3.0 --trials 80 --device cuda --out $OUT/search_432

Every config is scored the way ``python -m search.pareto`` scores it (``search.evaluate.Evaluator``: BN
re-calibrated on 1024 calibration images, then the whole validation split), through one shared cache, so a config
that two methods both find costs one evaluation and has one accuracy.  Three ways to spend evaluations:

* **ILP proxy**: the exact Ω-frontier over ``--sweep`` BitOPs budgets (``search.ilp.sweep``) plus the uniform
  configs — the front the proxy predicts, each point then measured;
* **Optuna**: ``--trials`` TPE trials over the whole BitOPs range (no constraint), no seeds;
* **ILP-seeded Optuna**: ``--trials`` trials of which the first are the ILP-proxy configs (enqueued seeds).

Prints a Markdown table last: evaluations, normalised hypervolume of each method's measured front (x = average-bit
equivalent, y = accuracy; box [lowest, highest uniform bit] × [lowest uniform config's accuracy, best accuracy
seen]), the best accuracy each found within the budget, next to every uniform config (validation, where the pick was
made, and the held-out test split, which the pick never saw), and sub-net
evaluations per minute on this device.  Writes search_evidence.{json,md}, candidates.csv and fronts.png/svg.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[search-evidence {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="supernet model.pt (hasb.train)")
    ap.add_argument("--sensitivity", required=True, help="sensitivity.json of the same model")
    ap.add_argument("--budget", default="3.0", help="average-bit equivalent or BitOPs budget (default 3.0)")
    ap.add_argument("--trials", type=int, default=80, help="Optuna trials per study (default 80)")
    ap.add_argument("--sweep", type=int, default=40, help="ILP frontier budgets (default 40)")
    ap.add_argument("--k-best", type=int, default=5, help="ILP alternatives at the budget (default 5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--val-limit", type=int, default=None, help="validation images (default: all 5000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/search_evidence")
    a = ap.parse_args(argv)

    import torch

    import hasb
    from hasb.data import load_dataset
    from hasb.sensitivity_file import check_for_model, load_sensitivity
    from hasb.train import load_supernet
    from search import ilp
    from search.evaluate import Evaluator, file_digest
    from search.front import hypervolume, pareto_mask
    from search.optuna_search import run_study, study_trials_frame

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    model = load_supernet(a.checkpoint).to(a.device)
    name = model.hasb_build["name"]
    cost = hasb.CostModel.from_model(model)
    sens = check_for_model(load_sensitivity(Path(a.sensitivity)), name, cost.names, a.sensitivity)
    space = ilp.build_space(cost, sensitivity=sens, objective="omega", groups=ilp.tied_groups(model))
    budget = cost.parse_budget(a.budget)
    cons = [ilp.constraint_from_budget(budget)]
    splits = load_dataset(val_limit=a.val_limit)
    ev = Evaluator(
        model,
        (splits.val, splits.calib),
        bn="recal",
        device=a.device,
        batch_size=1000,
        cache_path=out / "evals.json",
        context={"checkpoint": file_digest(a.checkpoint), "val_limit": a.val_limit},
    )

    rows: list[dict] = []

    def add(uc, method: str, **extra) -> None:
        rows.append(ilp._row(space, np.asarray(uc), method=method, **extra))

    # -- ILP proxy front (+ uniform), each point measured
    sweep = ilp.sweep(space, ilp.budget_grid(space, a.sweep), "bitops")
    unif = ilp.uniform_choices(space)
    ilp_seeds = [np.asarray(r.unit_choice) for _, r in sweep.iterrows()] + [uc for _, uc in unif]
    for uc in ilp_seeds:
        add(uc, "ILP proxy")
    for bit, uc in unif:
        add(uc, "uniform", label=f"w{bit}a{bit}")
    for s in ilp.k_best(space, cons, a.k_best):
        add(s.unit_choice, "ILP k-best at budget", rank=s.rank)
    first = {r["digest"]: space.config(r["unit_choice"]) for r in rows}
    ev.evaluate(next(iter(first.values())))  # warm-up: allocator, kernels
    if str(a.device).startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    n0 = ev.n_evaluated
    ev.evaluate_many(list(first.values()), desc="ILP + uniform")
    dt_eval = (time.perf_counter() - t) / max(ev.n_evaluated - n0, 1)
    log(f"{ev.n_evaluated - n0} configs in {dt_eval:.2f} s each ({60 / dt_eval:.0f}/min)")

    def fn(cfg):
        r = ev.evaluate(cfg)
        return r.accuracy, r.loss

    storage = f"sqlite:///{(out / 'optuna.db').resolve()}"
    for method, seeds in (("Optuna", []), ("ILP-seeded Optuna", ilp_seeds)):
        t = time.perf_counter()
        study = run_study(
            space,
            fn,
            constraints=(),
            storage=storage,
            study_name=f"{method}-{ev.context_key}-s{a.seed}-n{a.trials}",
            n_trials=a.trials,
            sampler="tpe",
            seed=a.seed,
            seeds=seeds,
            progress=False,
        )
        for _, tr in study_trials_frame(study, space).iterrows():
            add(tr.unit_choice, method, trial=int(tr.trial))
        log(f"{method}: {a.trials} trials in {time.perf_counter() - t:.0f} s")

    df = pd.DataFrame(rows)
    res = {d: ev.evaluate(space.config(uc)) for d, uc in zip(df.digest, df.unit_choice, strict=False)}
    df["accuracy"] = [res[d].accuracy for d in df.digest]
    df["feasible"] = [all(c.holds(r[c.metric]) for c in cons) for _, r in df.iterrows()]
    df.drop(columns=["unit_choice"]).to_csv(out / "candidates.csv", index=False)

    u = df[df.method == "uniform"].set_index("label")
    lo_bit, hi_bit = min(b for b, _ in unif), max(b for b, _ in unif)
    ref_acc = float(u.loc[f"w{lo_bit}a{lo_bit}", "accuracy"])
    top_acc = float(df.accuracy.max())
    box = (hi_bit - lo_bit) * max(top_acc - ref_acc, 1e-9)
    summary: dict = {
        "checkpoint": a.checkpoint,
        "model": name,
        "device": a.device,
        "gpu": torch.cuda.get_device_name(0) if str(a.device).startswith("cuda") else None,
        "budget": a.budget,
        "budget_bitops": cons[0].limit,
        "seconds_per_eval": dt_eval,
        "evals_per_min": 60 / dt_eval,
        "val_images": len(splits.val[1]),
        "uniform": {lbl: float(r.accuracy) for lbl, r in u.iterrows()},
        "methods": {},
    }
    for method in ("ILP proxy", "Optuna", "ILP-seeded Optuna"):
        m = df[df.method == method].drop_duplicates("digest")
        f = m[m.feasible]
        best = f.sort_values("accuracy", ascending=False).iloc[0] if len(f) else None
        summary["methods"][method] = {
            "evaluations": int(len(m)),
            "hypervolume": hypervolume(m.avg_bit_equivalent, m.accuracy, hi_bit, ref_acc) / box,
            "front_size": int(pareto_mask(m.bitops, m.accuracy).sum()),
            "best_at_budget": None
            if best is None
            else {
                "accuracy": float(best.accuracy),
                "avg_bit_equivalent": float(best.avg_bit_equivalent),
                "config": best.config,
            },
        }
    fe = df[df.feasible].sort_values("accuracy", ascending=False).iloc[0]
    summary["chosen"] = {
        "method": fe.method,
        "accuracy": float(fe.accuracy),
        "avg_bit_equivalent": float(fe.avg_bit_equivalent),
        "config": fe.config,
    }
    # the pick is the best of many configs scored on the validation split, so its validation accuracy is biased
    # upwards (winner's curse); the held-out test split (t10k) scores it and the uniform configs without that bias
    tev = Evaluator(model, (splits.test, splits.calib), bn="recal", device=a.device, batch_size=1000)
    summary["test"] = {
        "images": len(splits.test[1]),
        "chosen": tev.evaluate(space.config(fe.unit_choice)).accuracy,
        "uniform": {lbl: tev.evaluate(space.config(r.unit_choice)).accuracy for lbl, r in u.iterrows()},
    }
    summary["ilp_kbest_at_budget"] = [float(x) for x in df[df.method == "ILP k-best at budget"].accuracy]
    summary["seconds"] = time.time() - t_all
    plot(df, summary, budget.text, cost, out)
    (out / "search_evidence.json").write_text(json.dumps(summary, indent=2, default=str))
    md = table(summary)
    (out / "search_evidence.md").write_text(md)
    print(md)
    return 0


def plot(df: pd.DataFrame, summary: dict, budget_text: str, cost, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from search.pareto import pareto_mask

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=130)
    style = {"ILP proxy": ("o", "tab:blue"), "Optuna": ("^", "tab:orange"), "ILP-seeded Optuna": ("s", "tab:green")}
    for method, (mk, col) in style.items():
        m = df[df.method == method].drop_duplicates("digest")
        ax.scatter(m.avg_bit_equivalent, 100 * m.accuracy, marker=mk, s=14, color=col, alpha=0.35)
        fr = m[pareto_mask(m.bitops, m.accuracy)].sort_values("bitops")
        hv = summary["methods"][method]["hypervolume"]
        ax.step(
            fr.avg_bit_equivalent,
            100 * fr.accuracy,
            where="post",
            color=col,
            lw=1.6,
            label=f"{method} front ({len(m)} evals, HV {hv:.3f})",
        )
    u = df[df.method == "uniform"].drop_duplicates("label")
    ax.scatter(u.avg_bit_equivalent, 100 * u.accuracy, marker="*", s=120, color="black", zorder=5, label="uniform")
    for _, r in u.iterrows():
        ax.annotate(
            r.label, (r.avg_bit_equivalent, 100 * r.accuracy), textcoords="offset points", xytext=(5, -12), fontsize=8
        )
    b = cost.bitops_to_avg_bits(summary["budget_bitops"])
    ax.axvline(b, color="grey", ls="--", lw=1, label=f"budget {budget_text}")
    ch = summary["chosen"]
    ax.scatter(
        [ch["avg_bit_equivalent"]],
        [100 * ch["accuracy"]],
        s=160,
        facecolors="none",
        edgecolors="red",
        lw=1.8,
        zorder=6,
        label=f"chosen ({100 * ch['accuracy']:.2f}%)",
    )
    lo = 100 * min(summary["uniform"].values())
    ax.set_ylim(lo - 2, 100 * df.accuracy.max() + 1)
    ax.set_xlabel("average-bit equivalent (BitOPs of uniform W=A at that bit)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{summary['model']} supernet: measured fronts of three searches")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / f"fronts.{ext}")
    plt.close(fig)


def table(s: dict) -> str:
    L = [
        f"## Search evidence: {s['model']} supernet `{s['checkpoint']}`, budget {s['budget']} "
        f"({s['gpu'] or s['device']}; {s['val_images']} validation images, BN re-calibrated per config)",
        "",
        "| method | evaluations | front size | normalised hypervolume | best acc % within budget | its avg-bit eq. |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in s["methods"].items():
        b = m["best_at_budget"]
        L.append(
            f"| {name} | {m['evaluations']} | {m['front_size']} | {m['hypervolume']:.4f} | "
            + (f"{100 * b['accuracy']:.2f} | {b['avg_bit_equivalent']:.2f} |" if b else "– | – |")
        )
    te = s["test"]
    L += ["", f"| config | val acc % (selection) | test acc % ({te['images']} held-out images) |", "|---|---|---|"]
    for lbl, acc in sorted(s["uniform"].items(), key=lambda kv: kv[1]):
        L.append(f"| uniform {lbl} | {100 * acc:.2f} | {100 * te['uniform'][lbl]:.2f} |")
    c = s["chosen"]
    L.append(
        f"| **chosen at {s['budget']}** ({c['method']}, avg-bit eq. {c['avg_bit_equivalent']:.2f}) | "
        f"**{100 * c['accuracy']:.2f}** | **{100 * te['chosen']:.2f}** |"
    )
    L += [
        "",
        "ILP k-best at the budget (Ω order): " + ", ".join(f"{100 * x:.2f}" for x in s["ilp_kbest_at_budget"]),
        f"Sub-net evaluation (BN recal 1024 + {s['val_images']} val): {s['seconds_per_eval']:.2f} s = "
        f"{s['evals_per_min']:.0f} evaluations/min on {s['gpu'] or s['device']}; total {s['seconds']:.0f} s",
    ]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
