"""Evidence for the method's claims (issue 14): arms side by side over seeds, means with 95% confidence intervals.

For one workload, every arm is a set of *cells* (one library call each: ``hasb.train.train``,
``search.recipes.sensitivity_for``, ``search.evaluate.Evaluator``, ``search.ilp``, ``search.optuna_search``),
run once per seed.  Arms (``--arms``, default all):

  a  one-shot Double Rounding multi-precision model vs one separately trained LSQ model per bit, at equal
     training compute: one-shot E epochs × |bits| bit passes per step = |bits| models × E epochs × 1 pass
     (the same number of forward/backward passes over the same images);
  b  Double Rounding (half-up) vs MSB slicing (``rounding="msb"``: lower bits are the top bits of INT-h);
  c  ALRS on (``alrs="code"``) vs off;
  d  supernet stage from the same multi-precision model: HASB vs uniform vs tempered sampler (same epochs);
     each scored at the uniform configs and on random mixed configs (the same ones for every sampler);
  e  on the HASB supernet, at each budget (average-bit equivalents between w2 and w8): the Ω-ILP pick vs the
     best uniform config at or below the budget vs the best of N random configs within the budget vs the best of
     N Optuna (TPE) trials, each proposal over the budget repaired (``OPTUNA_INFEASIBLE``) before it is
     evaluated; random and Optuna pick on validation, every pick is scored once on held-out test images; plus the
     share of the random configs that beat the ILP pick on validation and of Optuna's proposals within the budget;
  f  proxy quality: Spearman ρ between Σ Ω (the ILP's objective) and the measured validation loss increase over
     the top-bit config, over ≥ 200 random configs of the HASB supernet;
  g  ``hasb.train --compile`` vs eager (issue 15: "training curves unchanged"): multi-precision, then the uniform
     supernet from it, each pipeline as a user runs it (compiled: specialised graphs per bit, then bits as data;
     CUDA graphs on CUDA), scored as arms a-d score; the same seed gives both pipelines the same initial weights
     and data order.

Resumable: each (cell, seed) writes ``OUT/cells/<cell>-s<seed>.json`` atomically when it finishes, and a rerun
skips finished cells (training runs continue from their last epoch checkpoint; the search cell reuses its
evaluation cache and Optuna study).  ``--time-limit S`` starts a cell only if it is expected to finish within
S seconds of this invocation's start (estimate: the slowest finished cell of its kind, else the workload's
prior), so a 10-minute device call stops cleanly and the next call continues.  ``--jobs N`` runs N cells at
once as separate processes (small networks leave a GPU mostly idle between kernel launches).  The last thing
printed is the table (also ``OUT/evidence.md``; everything in ``OUT/evidence.json``).

Workloads (``--workload``): ``mbv2-fmnist`` (the zoo's MobileNetV2, small-input stem, on Fashion-MNIST, bits
{8,6,4,2}: depthwise layers are fragile at low bits) and ``resnet20-narrow`` (the zoo's ``resnet20_narrow``,
8/16/32 channels).  Data: Debian's /usr/share/datasets/fashion-mnist or ``HASB_DATA_DIR``.  And ``lm``
(lm_small on python-stdlib, 256-byte windows, weight-only with fp activations, bits {8,6,4,3,2}): the unit is
bits per byte, lower is better, and every pick and paired difference follows that direction.

Sizing: ``WORKLOADS`` holds each workload's sizes, chosen so that its whole run (all arms, 3 seeds, 6 cells at
a time) takes about 10 minutes on one H200 (estimate and its derivation, from measured per-epoch times, in
benchmarks/RESULTS.md, "Evidence across seeds"); ``--smoke`` shrinks any workload to a CPU check of every code
path (small_cnn, bits {4,2}, 128 images: seconds per cell; no statistics to read from it).

    HASB_DATA_DIR=.data/fashion-mnist PYTHONPATH=. python -m benchmarks.evidence --workload mbv2-fmnist \\
        --out $OUT/ev --time-limit 540          # repeat the same command until it prints "complete"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.stats
import torch

import hasb
from hasb.cli import add_options, config_from_args, device_option, option, out_option, resolve_device, run_cli
from hasb.config import BitConfig, atomic_write_text, parse_bit
from hasb.data import load_dataset
from hasb.errors import HasbError
from hasb.metrics import pass_name
from hasb.sensitivity_file import check_for_model, load_sensitivity
from hasb.train import TrainConfig, load_supernet, train
from search import ilp
from search.evaluate import Evaluator, file_digest
from search.optuna_search import proposal_counts, run_study, study_trials_frame
from search.recipes import sensitivity_for

ARMS = ("a", "b", "c", "d", "e", "f", "g")
COMPILED = "_compiled"  # a training cell's name + this: the same run with ``compile=True`` (arm g)
# arm e's Optuna: a proposal over the budget is repaired (lowered greedily to fit), then evaluated; with
# "evaluate" (the budget a soft constraint) unseeded TPE spent every trial outside the 2.5-3.5-bit budgets
OPTUNA_INFEASIBLE = "repair"


# ---------------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """What one evidence run trains and scores; every size in one place (see the module docstring)."""

    name: str
    model: str
    data: str = "fashion-mnist"
    bits: tuple[int, ...] = (8, 6, 4, 2)
    epochs: int = 2  # multi-precision epochs E (arms a-c; each separate LSQ model also gets E)
    super_epochs: int = 2  # supernet epochs (arm d), warm-up 0
    batch_size: int = 256
    lr: float = 2e-3
    super_lr: float = 5e-4
    augment: bool = True
    train_limit: int | None = None  # training images (None: all 55,000)
    val_limit: int | None = None  # validation images the training runs score themselves on (None: all 5,000)
    eval_val: int = 2000  # validation images per config in arms d-f (BN re-calibrated per config)
    calib: int = 512  # BN re-calibration images per config
    test_limit: int | None = None  # held-out test images (None: all 10,000)
    budgets: tuple[float, ...] = (2.5, 3.0, 3.5, 5.0, 7.0)  # average-bit equivalents (arm e)
    n_search: int = 50  # random configs and Optuna trials per budget (arm e)
    n_proxy: int = 200  # random configs for the proxy's Spearman (arm f)
    n_mixed: int = 16  # random mixed configs scored on each supernet (arm d)
    max_hvp: int = 128  # Hutchinson probes for the traces (HASB/tempered probabilities, Ω)
    hvp_backend: str = "auto"  # analysis HVP backend (auto: timed per model)
    metric: str = "acc"  # metrics.json column prefix of the per-bit score
    scale: float = 100.0  # reported unit = value · scale
    unit: str = "accuracy, points"
    higher_is_better: bool = True  # the metric's direction (bits per byte: lower is better)
    act_bits: str = "same"  # hasb.train --act-bits: "same" (W+A) or "fp"/N (weight-only, how LMs deploy)
    data_opts: dict = field(default_factory=dict)  # hasb.train --data-opt (an LM's window length, corpus limit)
    est: dict = field(default_factory=dict)  # prior seconds per cell kind on the device (for --time-limit)

    def settings(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("est")
        return d


# Sizes chosen so that one workload's whole run (all arms, 3 seeds, 6 cells at a time) takes about 10 minutes on
# one H200; ``est`` = expected seconds per cell while 6 run side by side.  Derivation: benchmarks/RESULTS.md,
# "Evidence across seeds".
WORKLOADS: dict[str, Workload] = {
    "mbv2-fmnist": Workload(
        "mbv2-fmnist",
        model="mobilenet_v2",
        epochs=2,
        super_epochs=2,
        train_limit=20000,
        est={"multi": 130, "lsq": 45, "sens": 30, "super": 140, "search": 150, "proxy": 45},
    ),
    "resnet20-narrow": Workload(
        "resnet20-narrow",
        model="resnet20_narrow",
        epochs=3,
        super_epochs=2,
        train_limit=40000,
        est={"multi": 150, "lsq": 50, "sens": 25, "super": 115, "search": 80, "proxy": 30},
    ),
    # the lm-gpu recipe's model and data (benchmarks/RESULTS.md: one epoch of 24,576 windows ≈ 3 min per 5-pass
    # multi run while sharing the GPU); weight-only with fp activations
    "lm": Workload(
        "lm",
        model="lm_small",
        data="python-stdlib",
        bits=(8, 6, 4, 3, 2),
        epochs=1,
        super_epochs=1,
        batch_size=64,
        lr=3e-4,
        super_lr=2e-4,
        augment=False,
        train_limit=12_288,
        val_limit=256,
        eval_val=256,
        calib=64,
        test_limit=512,
        n_search=30,
        n_proxy=100,
        max_hvp=256,  # as the lm-gpu recipe: 64 left block 5 with < 2 probes per layer (an error, on the H200)
        metric="bpb",
        scale=1.0,
        unit="bits per byte",
        higher_is_better=False,
        act_bits="fp",
        data_opts={"context": 256},
        est={"multi": 130, "lsq": 25, "sens": 120, "super": 55, "search": 120, "proxy": 60},
    ),
}


def smoke(wl: Workload) -> Workload:
    """The same workload shrunk to seconds on a CPU: small_cnn at bits {4,2}, 128 training images, one epoch, few
    configs (every code path, none of the statistics)."""
    lm = wl.model.startswith("lm_")
    return dataclasses.replace(
        wl,
        model="lm_tiny" if lm else "small_cnn",
        data_opts={"context": 32, "limit": 200_000} if lm else wl.data_opts,
        bits=(4, 2),
        epochs=1,
        super_epochs=1,
        batch_size=64,
        augment=False,
        train_limit=128,
        val_limit=64,
        eval_val=64,
        calib=64,
        test_limit=128,
        budgets=(2.5, 3.5),
        n_search=3,
        n_proxy=12,
        n_mixed=2,
        max_hvp=64 if lm else 8,  # Hutchinson (LMs are not piecewise linear) needs ≥ 2 probes per layer
        hvp_backend="double_backward",
        est={},
    )


# ---------------------------------------------------------------------------------------------------- cells
@dataclass
class Ctx:
    """What every cell needs (picklable: handed to spawned processes)."""

    wl: Workload
    out: Path
    device: str
    threads: int

    def run_dir(self, cell: str, seed: int) -> Path:
        return self.out / "runs" / f"{cell}-s{seed}"

    def result_path(self, cell: str, seed: int) -> Path:
        return self.out / "cells" / f"{cell}-s{seed}.json"

    def done(self, cell: str, seed: int) -> bool:
        return self.result_path(cell, seed).is_file()

    def result(self, cell: str, seed: int) -> dict:
        return json.loads(self.result_path(cell, seed).read_text())


def lsq_cells(wl: Workload) -> list[str]:
    return [f"lsq{b}" for b in wl.bits]


def arm_cells(arm: str, wl: Workload) -> list[str]:
    """The cells an arm's rows read (their dependencies come from :func:`needs`)."""
    return {
        "a": ["multi", *lsq_cells(wl)],
        "b": ["multi", "msb"],
        "c": ["multi", "alrs_off"],
        "d": ["super_hasb", "super_uniform", "super_tempered"],
        "e": ["search"],
        "f": ["proxy"],
        "g": ["multi", "super_uniform", "multi" + COMPILED, "super_uniform" + COMPILED],
    }[arm]


def needs(cell: str) -> list[str]:
    if cell == "super_uniform" + COMPILED:  # arm g: the compiled pipeline's supernet from its own multi model
        return ["multi" + COMPILED]
    if cell == "sens" or cell == "super_uniform":
        return ["multi"]
    if cell.startswith("super_"):
        return ["multi", "sens"]
    if cell in ("search", "proxy"):
        return ["super_hasb", "sens"]
    return []


CHAIN = ("multi", "sens", "super_hasb", "search", "proxy")  # the longest dependency chain: started first


def off_chain(cell: str) -> bool:
    """Not on :data:`CHAIN`: can wait while the chain runs (nothing long waits for it)."""
    return cell not in CHAIN


def kind(cell: str) -> str:
    """The cell's kind (its function and its time estimate)."""
    cell = cell.removesuffix(COMPILED)
    if cell.startswith("lsq"):
        return "lsq"
    if cell.startswith("super_"):
        return "super"
    if cell in ("msb", "alrs_off"):
        return "multi"
    return cell


def plan(arms: list[str], wl: Workload) -> list[str]:
    """Every cell the arms need, dependencies first."""
    order: list[str] = []

    def add(c: str) -> None:
        for d in needs(c):
            add(d)
        if c not in order:
            order.append(c)

    for arm in arms:
        for c in arm_cells(arm, wl):
            add(c)
    return order


def _train_common(ctx: Ctx, seed: int) -> dict:
    wl = ctx.wl
    return dict(
        model=wl.model,
        data=wl.data,
        batch_size=wl.batch_size,
        augment=wl.augment,
        act_bits=wl.act_bits,
        data_opts=dict(wl.data_opts),
        train_limit=wl.train_limit,
        val_limit=wl.val_limit,
        device=ctx.device,
        bf16=ctx.device.startswith("cuda"),
        seed=seed,
        progress=False,
        threads=ctx.threads,
    )


def train_config(ctx: Ctx, cell: str, seed: int) -> TrainConfig:
    """The TrainConfig of a training cell (multi, msb, alrs_off, lsq<b>, super_<sampler>)."""
    wl = ctx.wl
    run = ctx.run_dir(cell, seed)
    compiled = cell.endswith(COMPILED)
    cell = cell.removesuffix(COMPILED)
    kw: dict = dict(stage="multi", epochs=wl.epochs, lr=wl.lr, bits=list(wl.bits), compile=compiled)
    if cell == "msb":
        kw["rounding"] = "msb"
    elif cell == "alrs_off":
        kw["alrs"] = "off"
    elif cell.startswith("lsq"):  # one LSQ model at one bit: no other bit to distil from
        kw.update(bits=[int(cell[3:])], distill="none")
    elif cell.startswith("super_"):
        sampler = cell[len("super_") :]
        kw.update(stage="supernet", epochs=wl.super_epochs, lr=wl.super_lr, sampler=sampler, warmup_epochs=0)
        kw["init"] = str(ctx.run_dir("multi" + (COMPILED if compiled else ""), seed) / "model.pt")
        if sampler != "uniform":
            kw["sensitivity"] = str(sens_path(ctx, seed))
    return TrainConfig(**_train_common(ctx, seed), out=str(run), **kw)


def sens_path(ctx: Ctx, seed: int) -> Path:
    return ctx.run_dir("sens", seed) / "sensitivity.json"


def train_resumable(cfg: TrainConfig) -> Path:
    """``train(cfg)``; a run killed mid-way continues from its last checkpoint, a finished one is reused."""
    out = Path(cfg.out)
    if (out / "model.pt").is_file():
        return out
    if (out / "checkpoint.pt").is_file():
        try:
            return train(dataclasses.replace(cfg, resume=True))
        except HasbError as e:  # a checkpoint of other settings: start over
            print(f"cannot resume {out} ({e}); training from scratch", file=sys.stderr)
    return train(dataclasses.replace(cfg, overwrite=True))


def label(wl: Workload, b: int) -> str:
    """The per-bit column name training records: ``w4a4`` (W+A) or ``w4afp`` (weight-only, fp activations)."""
    return pass_name(b, b if wl.act_bits == "same" else parse_bit(wl.act_bits))


def best_index(wl: Workload, values) -> int:
    """Index of the best score in the metric's direction."""
    return int(np.argmax(values) if wl.higher_is_better else np.argmin(values))


def better(wl: Workload, a: float, b: float) -> bool:
    return a > b if wl.higher_is_better else a < b


def cell_train(ctx: Ctx, cell: str, seed: int) -> dict:
    """Arms a-c: train, then the last epoch's per-bit validation score as the run recorded it (BN as trained)."""
    cfg = train_config(ctx, cell, seed)
    out = train_resumable(cfg)
    row = json.loads((out / "metrics.json").read_text())[-1]
    m, wl = ctx.wl.metric, ctx.wl
    values = {label(wl, b): wl.scale * float(row[f"{m}_{label(wl, b)}"]) for b in cfg.bits}
    return {"values": values, "info": {"split": row.get("val_split"), "n": row.get("val_n"), "bn": row.get("bn")}}


def cell_sens(ctx: Ctx, cell: str, seed: int) -> dict:
    """Layer-restricted Hutchinson traces of the seed's multi-precision model (for HASB, tempered and Ω)."""
    wl = ctx.wl
    out = ctx.run_dir(cell, seed)
    out.mkdir(parents=True, exist_ok=True)
    splits_kw = {"name": wl.data, "train_limit": wl.train_limit, "val_limit": wl.val_limit, **wl.data_opts}
    multi_pt = ctx.run_dir("multi", seed) / "model.pt"
    p = sensitivity_for(multi_pt, out, splits_kw, max_hvp=wl.max_hvp, device=ctx.device, backend=wl.hvp_backend)
    if p is None:
        raise HasbError(f"no sensitivity computed for seed {seed}")
    return {"values": {}, "info": {"path": str(p)}}


@dataclass
class Scoring:
    """A trained supernet with its validation Evaluator (BN re-calibrated per config, file cache) and test split."""

    model: torch.nn.Module
    ev: Evaluator
    test: tuple
    val_n: int


def _scoring(ctx: Ctx, model_pt: Path) -> Scoring:
    wl = ctx.wl
    model = load_supernet(model_pt, trusted_model=wl.model).to(ctx.device)
    splits = load_dataset(wl.data, val_limit=wl.eval_val, train_limit=wl.train_limit, **wl.data_opts)
    calib = tuple(t[: wl.calib] for t in splits.calib)
    test = tuple(t[: wl.test_limit] for t in splits.test)
    ev = Evaluator(
        model,
        (splits.val, calib),
        device=ctx.device,
        cache_path=model_pt.parent / "evals.json",
        task=splits.task,
        context={"checkpoint": file_digest(model_pt), "val": len(splits.val[1]), "calib": len(calib[1])},
    )
    return Scoring(model, ev, test, len(splits.val[1]))


def random_configs(layers: list[str], bits, n: int, rng: random.Random) -> list[BitConfig]:
    """``n`` configs spread over the average bit: per config a random preference over the bits, then per layer."""
    out = []
    for _ in range(n):
        w = [rng.random() for _ in bits]
        out.append(BitConfig({name: rng.choices(list(bits), weights=w)[0] for name in layers}))
    return out


def cell_super(ctx: Ctx, cell: str, seed: int) -> dict:
    """Arm d: train the supernet, then score uniform configs and the seed's random mixed configs (BN recal)."""
    out = train_resumable(train_config(ctx, cell, seed))
    sc = _scoring(ctx, out / "model.pt")
    model, ev = sc.model, sc.ev
    values = {label(ctx.wl, b): ctx.wl.scale * ev.evaluate(hasb.uniform_config(model, b)).value for b in ctx.wl.bits}
    # the same configs for every sampler of this seed (the rng depends on the seed only): paired differences
    mixed = random_configs(hasb.searchable_layers(model), ctx.wl.bits, ctx.wl.n_mixed, random.Random(seed))
    accs = [r.value for r in ev.evaluate_many(mixed)]
    values["mixed"] = ctx.wl.scale * float(np.mean(accs))
    return {"values": values, "info": {"val_n": sc.val_n, "mixed_configs": len(mixed)}}


def _space(ctx: Ctx, model, seed: int) -> ilp.SearchSpace:
    cost = hasb.CostModel.from_model(model)
    sens = check_for_model(load_sensitivity(sens_path(ctx, seed)), ctx.wl.model, cost.names, str(sens_path(ctx, seed)))
    return ilp.build_space(cost, sensitivity=sens, objective="omega", groups=ilp.tied_groups(model))


def random_unit_choices(space: ilp.SearchSpace, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random configs of the space (tied layers move together), spread over the average bit: per config
    a random preference over the choices, then one draw per unit."""
    allowed = space.unit_allowed()
    out = []
    for _ in range(n):
        pref = rng.random(len(space.choices))
        out.append(np.array([rng.choice(np.flatnonzero(a), p=pref[a] / pref[a].sum()) for a in allowed]))
    return out


def random_within(space: ilp.SearchSpace, limit: float, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` distinct random unit choices with BitOPs ≤ ``limit``: uniform draws, then random units lowered one
    step at a time until the config fits (so they sit near the budget, where the good configs are)."""
    allowed = space.unit_allowed()
    unit_cost = space.unit_matrix(space.metrics["bitops"])  # [U, C]
    out: list[np.ndarray] = []
    seen: set[tuple[int, ...]] = set()
    for _ in range(50 * n):
        if len(out) == n:
            break
        uc = np.array([rng.choice(np.flatnonzero(allowed[u])) for u in range(space.n_units)])
        while space.evaluate(uc)["bitops"] > limit:
            lower = [u for u in range(space.n_units) if (allowed[u] & (unit_cost[u] < unit_cost[u, uc[u]])).any()]
            if not lower:
                break
            u = int(rng.choice(lower))
            cheaper = np.flatnonzero(allowed[u] & (unit_cost[u] < unit_cost[u, uc[u]]))
            uc[u] = cheaper[np.argmax(unit_cost[u, cheaper])]
        key = tuple(int(c) for c in uc)
        if space.evaluate(uc)["bitops"] <= limit and key not in seen:
            seen.add(key)
            out.append(uc)
    return out


def _search_budget(ctx: Ctx, space, ev: Evaluator, test, b: float, seed: int) -> dict:
    """One budget of arm e: the four methods' picks on validation, each scored once on the test split."""
    wl = ctx.wl
    cons = [ilp.constraint_from_budget(space.cost.parse_budget(str(b)))]
    limit = cons[0].limit
    picks: dict[str, BitConfig] = {"ilp": ilp.solve(space, cons).config(space)}
    fitting = [(bit, uc) for bit, uc in ilp.uniform_choices(space) if space.evaluate(uc)["bitops"] <= limit]
    if fitting:
        picks["uniform"] = space.config(max(fitting, key=lambda t: t[0])[1])
    rand = [space.config(uc) for uc in random_within(space, limit, wl.n_search, np.random.default_rng(seed))]
    rand_acc = [r.value for r in ev.evaluate_many(rand)]
    picks["random"] = rand[best_index(wl, rand_acc)]
    study = run_study(
        space,
        lambda c: ((r := ev.evaluate(c)).value, r.loss),
        constraints=cons,
        storage=f"sqlite:///{(ctx.run_dir('search', seed) / 'optuna.db').resolve()}",
        study_name=f"budget-{b}-{OPTUNA_INFEASIBLE}",  # the old soft-constraint studies were "budget-{b}"
        n_trials=wl.n_search,
        seed=seed,
        direction="maximize" if wl.higher_is_better else "minimize",
        infeasible=OPTUNA_INFEASIBLE,
    )
    trials = study_trials_frame(study, space)
    feasible = trials[trials.feasible]
    if len(feasible):  # none only when every trial was over the budget (the "evaluate" mode's failure)
        picks["optuna"] = space.config(
            feasible.sort_values("value", ascending=not wl.higher_is_better).iloc[-1].unit_choice
        )
    ilp_val = ev.evaluate(picks["ilp"]).value
    vals = {f"{k}@{b}": wl.scale * ev.score(c, test).value for k, c in picks.items()}
    vals[f"ilp_beaten@{b}"] = 100.0 * float(np.mean([better(wl, a, ilp_val) for a in rand_acc]))
    vals[f"optuna_within@{b}"] = 100.0 * len(feasible) / max(len(trials), 1)
    within, proposed = proposal_counts(study)  # TPE's own proposals, before any repair
    vals[f"optuna_proposed_within@{b}"] = 100.0 * within / max(proposed, 1)
    vals[f"ilp_avgbit@{b}"] = float(space.cost.avg_bit_equivalent(picks["ilp"]))
    return vals


def cell_search(ctx: Ctx, cell: str, seed: int) -> dict:
    """Arm e: every budget on the seed's HASB supernet."""
    ctx.run_dir(cell, seed).mkdir(parents=True, exist_ok=True)
    sc = _scoring(ctx, ctx.run_dir("super_hasb", seed) / "model.pt")
    space = _space(ctx, sc.model, seed)
    values: dict = {}
    for b in ctx.wl.budgets:
        values.update(_search_budget(ctx, space, sc.ev, sc.test, b, seed))
    info = {"val_n": sc.val_n, "test_n": len(sc.test[1]), "evaluated": sc.ev.n_evaluated}
    return {"values": values, "info": info}


def cell_proxy(ctx: Ctx, cell: str, seed: int) -> dict:
    """Arm f: Spearman ρ(Σ Ω, measured validation loss − the top-bit config's) over random configs."""
    sc = _scoring(ctx, ctx.run_dir("super_hasb", seed) / "model.pt")
    space = _space(ctx, sc.model, seed)
    ucs = random_unit_choices(space, ctx.wl.n_proxy, np.random.default_rng(10_000 + seed))
    configs = [space.config(uc) for uc in ucs]
    base = sc.ev.evaluate(hasb.uniform_config(sc.model, ctx.wl.bits[0])).loss
    d_loss = [r.loss - base for r in sc.ev.evaluate_many(configs)]
    omega = [space.evaluate(uc)["objective"] for uc in ucs]
    if not (np.all(np.isfinite(d_loss)) and np.all(np.isfinite(omega))) or np.ptp(omega) == 0 or np.ptp(d_loss) == 0:
        raise HasbError(f"degenerate proxy data for seed {seed}: Σ Ω or the losses are constant or not finite")
    rho = float(scipy.stats.spearmanr(omega, d_loss).statistic)
    return {"values": {"rho": rho}, "info": {"configs": len(configs), "val_n": sc.val_n}}


CELL_FUNCS: dict[str, Callable[[Ctx, str, int], dict]] = {
    "multi": cell_train,
    "lsq": cell_train,
    "sens": cell_sens,
    "super": cell_super,
    "search": cell_search,
    "proxy": cell_proxy,
}


def run_cell(ctx: Ctx, cell: str, seed: int) -> None:
    """Run one cell and write its result JSON atomically (the marker that it is finished)."""
    t0 = time.time()
    res = CELL_FUNCS[kind(cell)](ctx, cell, seed)
    res.update(cell=cell, seed=seed, seconds=time.time() - t0)
    atomic_write_text(ctx.result_path(cell, seed), json.dumps(res, indent=1))


def _child(ctx: Ctx, cell: str, seed: int, log_path: str) -> None:
    """Entry point of a spawned cell process: its output goes to its log file."""
    import contextlib

    torch.set_num_threads(ctx.threads)
    with open(log_path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            run_cell(ctx, cell, seed)
        except BaseException:
            traceback.print_exc()
            raise


# ---------------------------------------------------------------------------------------------------- scheduler
@dataclass
class Scheduler:
    """Runs (cell, seed) jobs in dependency order, ``jobs`` at a time, within an optional time limit."""

    ctx: Ctx
    jobs: int
    time_limit: float | None
    t0: float = field(default_factory=time.monotonic)
    failed: set = field(default_factory=set)
    skipped: set = field(default_factory=set)
    ran: int = 0

    def estimate(self, cell: str) -> float:
        """Seconds the cell is expected to take: the slowest finished cell of its kind, else the prior."""
        seen = [
            json.loads(p.read_text()).get("seconds", 0.0)
            for p in (self.ctx.out / "cells").glob("*.json")
            if kind(p.name.rsplit("-s", 1)[0]) == kind(cell)
        ]
        return max(seen) if seen else float(self.ctx.wl.est.get(kind(cell), 0.0))

    def fits(self, cell: str) -> bool:
        if self.time_limit is None:
            return True
        return time.monotonic() - self.t0 + self.estimate(cell) <= self.time_limit

    def state(self, job: tuple[str, int]) -> str:
        """done, failed (or skipped, or blocked by one of those), ready or waiting."""
        cell, seed = job
        if self.ctx.done(cell, seed):
            return "done"
        if job in self.failed or job in self.skipped:
            return "failed"
        deps = [self.state((d, seed)) for d in needs(cell)]
        if "failed" in deps:
            return "failed"
        return "ready" if all(d == "done" for d in deps) else "waiting"

    def run(self, todo: list[tuple[str, int]]) -> None:
        running: dict[tuple[str, int], mp.process.BaseProcess] = {}
        spawn = mp.get_context("spawn")
        while True:
            for job, proc in list(running.items()):
                if not proc.is_alive():
                    proc.join()
                    del running[job]
                    self._finished(job, proc.exitcode == 0)
            # the chain multi → sens → supernets → search/proxy first; cells nothing waits for fill the gaps
            ready = sorted(
                (j for j in todo if j not in running and self.state(j) == "ready"), key=lambda j: off_chain(j[0])
            )
            for job in ready[: max(0, self.jobs - len(running))]:
                if not self.fits(job[0]):
                    self.skipped.add(job)
                    log(f"skip {job[0]} seed {job[1]}: ~{self.estimate(job[0]):.0f} s would pass --time-limit")
                elif self.jobs <= 1:
                    self._inline(job)
                else:
                    running[job] = self._spawn(spawn, job)
            if not running and not any(self.state(j) == "ready" for j in todo):
                return
            time.sleep(0.2 if running else 0.0)

    def _spawn(self, spawn, job: tuple[str, int]) -> mp.process.BaseProcess:
        cell, seed = job
        log_path = self.ctx.out / "logs" / f"{cell}-s{seed}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log(f"start {cell} seed {seed} (log {log_path})")
        p = spawn.Process(target=_child, args=(self.ctx, cell, seed, str(log_path)), name=f"{cell}-s{seed}")
        p.start()
        return p

    def _inline(self, job: tuple[str, int]) -> None:
        log(f"start {job[0]} seed {job[1]}")
        try:
            run_cell(self.ctx, *job)
            self._finished(job, True)
        except Exception:
            traceback.print_exc()
            self._finished(job, False)

    def _finished(self, job: tuple[str, int], ok: bool) -> None:
        cell, seed = job
        if ok and self.ctx.done(cell, seed):
            self.ran += 1
            log(f"done {cell} seed {seed} ({self.ctx.result(cell, seed)['seconds']:.0f} s)")
        else:
            self.failed.add(job)
            log(f"FAILED {cell} seed {seed} (see {self.ctx.out / 'logs' / f'{cell}-s{seed}.log'})")


def log(msg: str) -> None:
    print(f"[evidence {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- statistics
def mean_ci(xs: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% confidence interval from the t-distribution with n−1 df, n); nan width if n < 2."""
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    m = float(np.mean(xs))
    if n < 2:
        return m, math.nan, 1
    sd = float(np.std(xs, ddof=1))
    return m, float(scipy.stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n), n


def fmt_ci(xs: list[float], signed: bool = False) -> str:
    """``mean ± half-width (n)``; a paired difference whose interval excludes 0 is marked ``*``."""
    m, h, n = mean_ci(xs)
    if n == 0:
        return "–"
    s = f"{m:+.2f}" if signed else f"{m:.2f}"
    if math.isnan(h):
        return f"{s} (n=1)"
    star = " *" if signed and abs(m) > h else ""
    return f"{s} ± {h:.2f}{star}"


# ---------------------------------------------------------------------------------------------------- the table
@dataclass
class Row:
    """One table row: ``source(column) -> (cell, key)`` of the value in that cell's result."""

    label: str
    source: Callable[[str], tuple[str, str]]


@dataclass
class Group:
    """One arm's block: columns, the reference row and the rows compared with it (paired, per seed)."""

    arm: str
    title: str
    columns: list[str]
    ref: Row | None
    rows: list[Row]
    headers: list[str] | None = None
    extra: list[Row] = field(default_factory=list)  # rows shown without a paired difference


def groups(wl: Workload) -> list[Group]:
    bitcols = [label(wl, b) for b in wl.bits]
    passes = len(wl.bits) * wl.epochs
    same = lambda cell: lambda col: (cell, col)  # noqa: E731 - a row reading column `col` of one cell
    at = lambda method: lambda col: ("search", f"{method}@{col}")  # noqa: E731
    return [
        Group(
            "a",
            f"a. one-shot Double Rounding vs separate LSQ per bit, equal compute: one-shot {wl.epochs} epoch(s) × "
            f"{len(wl.bits)} bit passes = {passes} pass-epochs; separate {len(wl.bits)} models × {wl.epochs} epoch(s) "
            f"× 1 pass = {passes} pass-epochs",
            bitcols,
            Row("separate LSQ model per bit", lambda col: (f"lsq{col[1:].split('a')[0]}", col)),
            [Row("one-shot Double Rounding", same("multi"))],
        ),
        Group(
            "b",
            "b. Double Rounding (half-up) vs MSB slicing",
            bitcols,
            Row("Double Rounding", same("multi")),
            [Row("MSB slicing", same("msb"))],
        ),
        Group("c", "c. ALRS on vs off", bitcols, Row("ALRS on", same("multi")), [Row("ALRS off", same("alrs_off"))]),
        Group(
            "d",
            f"d. supernet samplers, {wl.super_epochs} epoch(s) each from the same multi-precision model; BN "
            f"re-calibrated per config ({wl.calib} images); mixed = mean over {wl.n_mixed} random configs",
            [*bitcols, "mixed"],
            Row("uniform sampler", same("super_uniform")),
            [Row("HASB sampler", same("super_hasb")), Row("tempered sampler", same("super_tempered"))],
        ),
        _search_group(wl, at),
        Group(
            "f",
            f"f. proxy quality: Spearman ρ(Σ Ω, validation loss increase over {label(wl, wl.bits[0])}) over "
            f"{wl.n_proxy} random configs of the HASB supernet",
            ["rho"],
            None,
            [Row("Spearman ρ", same("proxy"))],
            headers=["ρ"],
        ),
        Group(
            "g",
            f"g. `--compile` vs eager, multi-precision ({wl.epochs} epoch(s), the last epoch's validation score)",
            bitcols,
            Row("eager", same("multi")),
            [Row("compiled", same("multi" + COMPILED))],
        ),
        Group(
            "g",
            f"g. `--compile` vs eager, uniform-sampler supernet ({wl.super_epochs} epoch(s)) from that pipeline's "
            f"multi-precision model; scored as arm d",
            [*bitcols, "mixed"],
            Row("eager", same("super_uniform")),
            [Row("compiled", same("super_uniform" + COMPILED))],
        ),
    ]


def _search_group(wl: Workload, at) -> Group:
    """Group e: the searches on the HASB supernet per average-bit budget."""
    return Group(
        "e",
        f"e. search on the HASB supernet per average-bit budget: picks made on validation ({wl.eval_val} images), "
        f"scored once on test ({wl.test_limit or 10000} images); random = best of {wl.n_search} within the "
        f"budget, Optuna = best of "
        f"{wl.n_search} TPE trials (proposals over the budget: {OPTUNA_INFEASIBLE})",
        [str(b) for b in wl.budgets],
        Row("uniform at or below the budget", at("uniform")),
        [
            Row("Ω-ILP pick", at("ilp")),
            Row("best random", at("random")),
            Row(f"best Optuna ({OPTUNA_INFEASIBLE})", at("optuna")),
        ],
        headers=[f"≤ {b} bits" for b in wl.budgets],
        extra=[
            Row("% of random configs beating the ILP pick (val)", at("ilp_beaten")),
            Row("% of Optuna trials (evaluated) within the budget", at("optuna_within")),
            Row("% of Optuna's proposals within the budget (as proposed)", at("optuna_proposed_within")),
            Row("average-bit equivalent of the ILP pick", at("ilp_avgbit")),
        ],
    )


def values(results: dict, row: Row, col: str, seeds: list[int]) -> dict[int, float]:
    """{seed: value} of one row and column over the seeds whose cell finished and holds the key."""
    cell, key = row.source(col)
    out = {}
    for s in seeds:
        v = results.get((cell, s), {}).get("values", {}).get(key)
        if v is not None:
            out[s] = float(v)
    return out


def render_group(g: Group, results: dict, seeds: list[int]) -> list[str]:
    heads = g.headers or g.columns
    L = [f"### {g.title}", "", "| | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    rows = ([g.ref] if g.ref else []) + g.rows + g.extra
    for r in rows:
        label = r.label + (" (reference)" if r is g.ref else "")
        L.append(f"| {label} | " + " | ".join(fmt_ci(list(values(results, r, c, seeds).values())) for c in g.columns))
        L[-1] += " |"
    for r in g.rows if g.ref else []:
        cells = []
        for c in g.columns:
            a, ref = values(results, r, c, seeds), values(results, g.ref, c, seeds)
            cells.append(fmt_ci([a[s] - ref[s] for s in a if s in ref], signed=True))
        L.append(f"| {r.label} − {g.ref.label} (paired) | " + " | ".join(cells) + " |")
    return L + [""]


def render(results: dict, wl: Workload, arms: list[str], seeds: list[int], header: str) -> str:
    L = [
        header,
        "",
        f"Each cell: mean over seeds ± half-width of the 95% confidence interval (t-distribution, n−1 df); "
        f"'*' marks a paired difference whose interval excludes 0. Unit: {wl.unit} ({'higher' if wl.higher_is_better else 'lower'} is better) unless the "
        "block says otherwise. Arms a-c: the last epoch's validation score as the run recorded it "
        f"({wl.val_limit or 5000} images, per-bit BN as trained).",
        "",
    ]
    for g in groups(wl):
        if g.arm in arms:
            L += render_group(g, results, seeds)
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------------- the CLI
def _csv(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


@dataclass
class EvidenceConfig:
    workload: str = option("mbv2-fmnist", choices=list(WORKLOADS), help="what to train and score")
    arms: list = option(default_factory=lambda: list(ARMS), parse=_csv, help="comma-separated subset of a,b,c,d,e,f,g")
    seeds: list = option(default_factory=lambda: [0, 1, 2], parse=_csv, help="comma-separated seeds (≥ 3 for CIs)")
    out: str = out_option("results folder (cells/, runs/, logs/, evidence.md, evidence.json)", required=True)
    device: str = device_option()
    jobs: int | None = option(None, help="cells at once, each a process (default: 1 on cpu, 6 on cuda)")
    time_limit: float | None = option(None, help="seconds: start a cell only if it should finish by then")
    smoke: bool = option(False, help="tiny settings (small_cnn, 128 images, one epoch): a CPU check of every code path")


def _check(cfg: EvidenceConfig) -> tuple[list[str], list[int]]:
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad or not cfg.arms:
        raise HasbError(f"--arms {','.join(cfg.arms)!r}: accepted a comma-separated subset of {','.join(ARMS)}")
    try:
        seeds = [int(s) for s in cfg.seeds]
    except ValueError:
        raise HasbError(f"--seeds must be comma-separated integers, got {','.join(map(str, cfg.seeds))!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise HasbError("--seeds must name at least one seed, each once")
    if cfg.jobs is not None and cfg.jobs < 1 or cfg.time_limit is not None and not cfg.time_limit > 0:
        raise HasbError("--jobs must be ≥ 1 and --time-limit > 0")
    return [a for a in ARMS if a in cfg.arms], seeds


def _claim_out(out: Path, settings: dict) -> None:
    """``out`` holds results of these settings only: a rerun with other sizes must not mix with them."""
    meta = out / "settings.json"
    settings = json.loads(json.dumps(settings))  # tuples as the file holds them (lists)
    if meta.is_file() and json.loads(meta.read_text()) != settings:
        raise HasbError(f"{out} holds evidence of other settings ({meta}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, json.dumps(settings, indent=1, sort_keys=True))


def _header(wl: Workload, seeds: list[int], device: str, jobs: int) -> str:
    dev = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    bits = ",".join(map(str, wl.bits))
    return (
        f"## Evidence: {wl.name} ({wl.model} on {wl.data}, bits {bits}; seeds {','.join(map(str, seeds))})\n\n"
        f"{dev}, torch {torch.__version__}, {jobs} cell(s) at a time; command: `python -m benchmarks.evidence {' '.join(sys.argv[1:])}`"
    )


def run_evidence(cfg: EvidenceConfig) -> int:
    """Run (or continue) every cell the arms need, then print the table; 0 when complete, 3 when cells remain
    (rerun to continue), 1 when a cell failed."""
    arms, seeds = _check(cfg)
    wl = smoke(WORKLOADS[cfg.workload]) if cfg.smoke else WORKLOADS[cfg.workload]
    device = str(resolve_device(cfg.device))
    jobs = cfg.jobs or (1 if device == "cpu" else 6)
    out = Path(cfg.out)
    _claim_out(out, wl.settings())
    ctx = Ctx(wl, out, device, threads=max(1, (os.cpu_count() or 1) // jobs))
    todo = [(c, s) for c in plan(arms, wl) for s in seeds]
    sched = Scheduler(ctx, jobs, cfg.time_limit)
    sched.run(todo)
    results = {(c, s): ctx.result(c, s) for c, s in todo if ctx.done(c, s)}
    missing = [f"{c}-s{s}" for c, s in todo if (c, s) not in results]
    secs = sum(r["seconds"] for r in results.values())
    status = (
        f"{len(results)}/{len(todo)} cells finished ({sched.ran} in this call; {secs:.0f} cell-seconds in all); "
        + ("complete" if not missing else f"incomplete, rerun the same command to continue: {' '.join(missing)}")
    )
    md = render(results, wl, arms, seeds, _header(wl, seeds, device, jobs)) + "\n" + status + "\n"
    atomic_write_text(out / "evidence.md", md)
    dump = {"settings": wl.settings(), "arms": arms, "seeds": seeds, "status": status, "cells": list(results.values())}
    atomic_write_text(out / "evidence.json", json.dumps(dump, indent=1))
    print(md)
    return 1 if sched.failed else (3 if missing else 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, EvidenceConfig)
    ns = ap.parse_args(argv)
    return run_cli(lambda: run_evidence(config_from_args(EvidenceConfig, ns)))


if __name__ == "__main__":
    sys.exit(main())
