"""The search as a library call: ``run_search(SearchConfig(budget=["3.5"]))``.

1. Inputs: a trained supernet (``checkpoint``, a ``model.pt`` from ``hasb.train`` or ``hasb.export.save_quantized``)
   and its sensitivity.json; without them the built-in demo (small_cnn on real Fashion-MNIST) is trained and
   analysed on first use and cached in ``out``.  Everything cheap is validated before anything is trained,
   evaluated or written.
2. Budgets from ``hasb.CostModel`` (average-bit equivalent, BitOPs, size, effective bits, the paper's plain
   average; all apply).
3. Candidates: the exact ILP frontier over a BitOPs sweep, the k best ILP configs at the budget, uniform configs,
   the picks of earlier budgets in ``out`` (so picks are monotone in the budget) and an Optuna study.
4. Every candidate is scored on the validation split with the data task's metric (accuracy ↑ for classification,
   bits per byte ↓ for language models; BN re-calibrated per config where the model has BN; cached); the best
   config in budget is scored ONCE on the held-out test split, which selection never sees.
5. Outputs: shared pareto.csv / candidates.csv at the top of ``out``; per budget ``out/budget-3.5/``: config.json
   (validation and test scores with standard errors), deploy.pt (the scored network), table.csv, pareto.png/svg.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch

import hasb
from hasb import outset
from hasb.cli import (
    data_dir_option,
    data_opts_option,
    device_option,
    force_option,
    model_option,
    option,
    out_lock,
    out_option,
    parse_bits,
    quiet_option,
    resolve_device,
    seed_option,
    set_threads,
    threads_option,
)
from hasb.config import BitConfig, ConfigError, atomic_write_text, bit_str
from hasb.cost import Budget
from hasb.data import DATASETS, check_idx_dir, open_source
from hasb.errors import HasbError
from hasb.models import build_record, check_model_name
from hasb.quantize import get_spec

from . import demo, formats, ilp
from . import export as sx
from . import outputs as so
from .evaluate import METRICS, Evaluator, Metric
from .front import pareto_mask
from .inputs import (
    InputError,
    Inputs,
    check_out_dir,
    checkpoint_inputs,
    parse_budgets,
)
from .onnx_export import deployment_to_onnx
from .optuna_search import INFEASIBLE, SAMPLERS, run_study, study_trials_frame, validate_storage

DEFAULT_OUT = "runs/demo"
SET_MANIFEST = "search.manifest.json"  # in --out (shared tables) and each budget folder: the set, written last
# the demo scores on all 5,000 validation images (SE ≈ 0.45 points at 88%): its configs differ by up to 3 points
USER_DEFAULTS = {"trials": 40, "sweep": 40, "calib_size": 1024, "val_limit": None}
DEMO_DEFAULTS = {"trials": 24, "sweep": 20, "calib_size": 512, "val_limit": None}


def repeatable(help: str):
    """A list option that may be given several times (``--budget 3.5 --budget 25GBOPs``)."""
    return dataclasses.field(default_factory=list, metadata={"repeat_help": help})


@dataclass
class SearchConfig:
    """Every option of the search, declared once (the CLI is generated from these fields)."""

    budget: list = repeatable(
        "average-bit equivalent (3.5), BitOPs (25GBOPs, 2.5e10) or effective bits, the parameter-weighted mean "
        "weight bit of the searchable layers (3.5ebits); repeatable; all apply"
    )
    size: list = repeatable("model size budget, e.g. 1.2MB, 300kB (bare number = MB); repeatable")
    avg_bits: list = repeatable("the paper's plain (unweighted) average bit budget, e.g. 3; repeatable")
    model: str | None = model_option()
    checkpoint: str | None = option(None, help="supernet model.pt (hasb.train / hasb.export) or its run directory")
    sensitivity: str | None = option(None, help="sensitivity.json (default: next to the checkpoint)")
    data: str | None = option(
        None,
        help="dataset: fashion-mnist, mnist, npz:PATH, imagefolder:DIR, text:PATH_OR_GLOB, python-stdlib or "
        "package.module:callable (default: the checkpoint's training data)",
    )
    data_dir: str | None = data_dir_option()
    data_opt: dict = data_opts_option("given ones update the training run's; a text context defaults to the model's")
    out: str = out_option("run directory; each budget's outputs go to OUT/budget-<budget>/", default=DEFAULT_OUT)
    bits: list | None = option(
        None,
        parse=parse_bits,
        help="search only these of the supernet's candidate bits, e.g. 8,4,2 (default: all of them)",
    )
    trials: int | None = option(None, help="Optuna trials (COMPLETE trials in the study; default 40, demo 24)")
    storage: str | None = option(
        None,
        help="Optuna storage: default SQLite in --out; postgresql://..., "
        "sqlite:///FILE or journal:FILE to share one study between workers",
    )
    optuna_sampler: str = option(
        "tpe",
        choices=SAMPLERS,
        aliases=("--sampler",),
        help="Optuna sampler (tpe: measured better than NSGA-II, see search.optuna_search)",
    )
    optuna_infeasible: str = option(
        "repair",
        choices=INFEASIBLE,
        help="an Optuna proposal over the budget: repair (lowered greedily to fit, then evaluated), skip (not "
        "evaluated) or evaluate (the budget only a soft constraint); see search.optuna_search",
    )
    k_best: int = option(3, help="ILP alternatives at the budget")
    sweep: int | None = option(None, help="budgets in the ILP frontier sweep (default 40, demo 20)")
    seed: int = seed_option()
    no_optuna: bool = option(False, help="ILP and uniform configs only")
    force: bool = force_option()
    objective: str = option("omega", choices=("omega", "paper"), help="ILP objective: min Σ Ω or the paper's max Σ t·b")
    untied: bool = option(False, help="search weight and activation bits separately")
    no_tie: bool = option(False, help="do not tie residual shortcut convs to their block")
    bn: str = option(
        "recal",
        choices=("recal", "stored"),
        help="BN statistics per config: re-calibrated on calibration images, or stored (TBN/per-bit)",
    )
    batch_size: int = option(1000, help="evaluation batch size")
    val_limit: int | None = option(None, help="score on the first N validation images only (default all; demo 2000)")
    test_limit: int | None = option(None, help="score the pick on the first N test images (default all)")
    calib_size: int | None = option(None, help="BN re-calibration images (default 1024, demo 512)")
    device: str = device_option()
    threads: int | None = threads_option()
    json: bool = option(False, help="print a machine-readable summary on stdout")
    progress: bool = quiet_option()
    command: str = ""  # the command line, recorded in config.json's provenance


def with_defaults(cfg: SearchConfig) -> SearchConfig:
    """The config with the demo's or a user run's defaults filled in (the options left at None)."""
    dflt = DEMO_DEFAULTS if cfg.checkpoint is None else USER_DEFAULTS
    return dataclasses.replace(cfg, **{k: v for k, v in dflt.items() if getattr(cfg, k) is None})


def validate_config(cfg: SearchConfig) -> None:
    """Cheap checks of the numbers, the output folder and the storage, before anything is read or written."""
    for name, allow_zero in (
        ("trials", True),
        ("k_best", False),
        ("sweep", False),
        ("batch_size", False),
        ("val_limit", False),
        ("test_limit", False),
        ("calib_size", False),
    ):
        v = getattr(cfg, name)
        if v is not None and (v < 0 or (v == 0 and not allow_zero)):
            raise InputError(f"--{name.replace('_', '-')} must be {'≥ 0' if allow_zero else 'positive'}, got {v}")
    check_out_dir(cfg.out)
    if cfg.storage is not None:
        validate_storage(cfg.storage)


def _space(cfg: SearchConfig, inputs: Inputs) -> ilp.SearchSpace:
    """The search space; an all-zero objective when there is no sensitivity yet (the demo skeleton)."""
    bits = cfg.bits or list(inputs.cost.candidate_bits)
    if not set(bits) <= set(inputs.cost.candidate_bits):
        raise InputError(
            f"--bits {','.join(map(str, bits))} are not all candidates of the supernet "
            f"({','.join(map(str, inputs.cost.candidate_bits))})"
        )
    n_choices = len(bits) ** (2 if cfg.untied else 1)
    objective = cfg.objective if inputs.sensitivity else np.zeros((len(inputs.cost.names), n_choices))
    groups = ilp.tied_groups(inputs.model) if not cfg.no_tie else []
    return ilp.build_space(
        inputs.cost,
        sensitivity=inputs.sensitivity or None,
        objective=objective,
        tied_wa=not cfg.untied,
        groups=groups,
        bits=bits,
    )


def prepare(cfg: SearchConfig) -> tuple[Inputs, list[Budget]]:
    """Validated inputs and budgets; for the demo an untrained skeleton (nothing trained or written yet)."""
    check_model_name(cfg.model)
    if cfg.checkpoint is None:
        demo.check_demo_args(cfg.model, cfg.data, cfg.sensitivity, cfg.data_dir)
        pre = demo.skeleton_inputs(cfg.data_dir)
    else:
        pre = checkpoint_inputs(
            cfg.checkpoint,
            cfg.sensitivity,
            model=cfg.model,
            data=cfg.data,
            data_dir=cfg.data_dir,
            data_opts=cfg.data_opt,
        )
        check_data(pre)  # DataError (one line) before any candidate is evaluated
    budgets = parse_budgets(pre.cost, cfg.budget, cfg.size, cfg.avg_bits)
    ilp.solve(_space(cfg, pre), budgets)  # InfeasibleError (with the feasible range) for a combination
    return pre, budgets


def check_data(inputs: Inputs) -> None:
    """The data exists and reads: the IDX files are found, any other source is opened (and kept for the search)."""
    if inputs.data in DATASETS:
        check_idx_dir(inputs.data, inputs.data_dir)  # found, and every IDX file reads
    elif inputs.source is None:
        inputs.source = open_source(inputs.data, inputs.data_dir, **inputs.data_opts)


def run_search(cfg: SearchConfig) -> dict:
    """Validate everything cheap, then search; returns the summary dict (also written as files)."""
    cfg = with_defaults(cfg)
    validate_config(cfg)
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    pre, budgets = prepare(cfg)
    with out_lock(cfg.out):  # a second search on the same --out fails clearly instead of mixing outputs
        recover_outputs(Path(cfg.out))
        inputs = demo.demo_inputs(Path(cfg.out), cfg.data_dir) if pre.demo else pre
        return search(cfg, inputs, budgets, device)


class SplitLoader:
    """The run's data, loaded on first need (a fully cached search never reads it): val/calib and test."""

    def __init__(self, cfg: SearchConfig, inputs: Inputs):
        self.cfg, self.inputs = cfg, inputs
        self._splits = None

    def splits(self):
        if self._splits is None:
            i = self.inputs
            src = i.source or open_source(i.data, i.data_dir, **i.data_opts)
            self._splits = src.splits(
                i.seed, val_size=i.val_size, val_limit=self.cfg.val_limit, calib_size=self.cfg.calib_size
            )
        return self._splits

    def val_calib(self):
        return self.splits().val, self.splits().calib

    def test(self):
        x, y = self.splits().test
        n = self.cfg.test_limit or len(x)
        return x[:n], y[:n]

    def info(self, n_val: int, n_test: int) -> tuple[so.SplitInfo, so.SplitInfo]:
        if self.inputs.task == "lm":
            return self._lm_info(n_val, n_test)
        i = self.inputs
        val = so.SplitInfo(
            "validation",
            f"{n_val} images: the first {n_val} of the {i.val_size} held out of "
            f"{i.data} train (seed {i.seed}); every candidate was scored on them",
        )
        test = so.SplitInfo(
            "test",
            f"{n_test} images: {'the first ' + str(n_test) + ' of ' if self.cfg.test_limit else ''}{i.data}'s test set",
        )
        return val, test

    def _lm_info(self, n_val: int, n_test: int) -> tuple[so.SplitInfo, so.SplitInfo]:
        """Split descriptions of a language-model source: windows × bytes of held-out files."""
        d = self.splits().describe()
        t, files = int(self.splits().input_shape[0]), d.get("files", {})
        held = d.get("split", "whole files by a hash of their path")
        first = lambda n, tot: f"the first {n} of {tot}" if n < tot else f"all {n}"  # noqa: E731
        val = so.SplitInfo(
            "validation",
            f"{n_val} windows × {t} bytes: {first(n_val, len(self.splits().val[0]))} windows of the "
            f"{files.get('val', '?')} val files of {self.inputs.data} ({held}); every candidate was scored on them",
            window_bytes=t,
        )
        test = so.SplitInfo(
            "test",
            f"{n_test} windows × {t} bytes: {first(n_test, len(self.splits().test[0]))} windows of the "
            f"{files.get('test', '?')} test files of {self.inputs.data}",
            window_bytes=t,
        )
        return val, test


def make_evaluator(cfg: SearchConfig, inputs: Inputs, data: SplitLoader, device, out: Path) -> Evaluator:
    """The cached evaluator of this supernet and split (the cache key names everything the scores depend on)."""
    ctx = {
        "checkpoint": inputs.checkpoint_sha,
        "data": inputs.data,
        "val_size": inputs.val_size,
        "val_limit": cfg.val_limit,
        "seed": inputs.seed,
        "calib_size": cfg.calib_size,
        "data_opts": inputs.data_opts,
    }
    cache = out / "evals.json"
    if cfg.force and cache.exists():
        cache.unlink()
    return Evaluator(
        inputs.model,
        data.val_calib,
        bn=cfg.bn,
        task=inputs.task,
        batch_size=cfg.batch_size,
        cache_path=cache,
        context=ctx,
        device=device,
    )


def ilp_candidates(cfg: SearchConfig, space: ilp.SearchSpace, cons: list) -> tuple[list[dict], list]:
    """Rows of the ILP frontier sweep, the k best at the budget and the uniform configs; and the Optuna seeds."""
    rows = []
    for _, r in ilp.sweep(space, ilp.budget_grid(space, cfg.sweep), "bitops").iterrows():
        rows.append(ilp._row(space, np.asarray(r.unit_choice), source="ilp", budget=r.budget, rank=0))
    at_budget = ilp.k_best(space, cons, cfg.k_best)
    for s in at_budget:
        rows.append(ilp._row(space, np.asarray(s.unit_choice), source="ilp", budget=cons[0].limit, rank=s.rank))
    unif = ilp.uniform_choices(space)
    for _, uc in unif:
        w, a = space.choices[int(uc[0])]
        rows.append(ilp._row(space, np.asarray(uc), source="uniform", label=f"w{bit_str(w)}a{bit_str(a)}"))
    return rows, [s.unit_choice for s in at_budget] + [uc for _, uc in unif]


def earlier_picks(out: Path, space: ilp.SearchSpace, inputs: Inputs) -> list[dict]:
    """Rows of the configs picked at other budgets in ``out`` for the same supernet (monotone picks)."""
    rows = []
    for p in sorted(out.glob("budget-*/config.json")):
        if outset.verify(p.parent, SET_MANIFEST) is None:
            continue  # not a complete output set (a run that crashed while writing it)
        try:
            cfg, doc = sx.load(p)
            uc = space.unit_choice_of(cfg)
        except (sx.ExportError, ConfigError):
            continue  # another model, space or schema: not a candidate of this search
        if doc["provenance"].get("checkpoint_sha256") == inputs.checkpoint_sha:
            rows.append(ilp._row(space, uc, source=doc["source"], pick_at=p.parent.name))
    return rows


def study_name(cfg: SearchConfig, inputs: Inputs, space: ilp.SearchSpace, ev: Evaluator, budgets) -> str:
    """One study per supernet, evaluation context, search space, budget, sampler, infeasible mode and seed."""
    bkey = "_".join(f"{b.kind}{b.limit if b.kind != 'plain_avg' else b.value:.6g}" for b in budgets)
    # the study's parameters are the space's units and choices: a different space is a different study
    skey = hashlib.sha1(json.dumps([space.unit_names(), space.choices, space.objective_name]).encode()).hexdigest()[:8]
    # a proposal over the budget is handled differently per mode: a different procedure is a different study
    mode = cfg.optuna_sampler + ("" if cfg.optuna_infeasible == "evaluate" else f"-{cfg.optuna_infeasible}")
    return f"hasb-{inputs.model_name}-{ev.context_key}-{skey}-{bkey}-{mode}-s{cfg.seed}"


def optuna_candidates(
    cfg: SearchConfig, space: ilp.SearchSpace, cons: list, ev: Evaluator, name: str, seeds: list, out: Path
) -> list[dict]:
    """Rows of the COMPLETE trials of the Optuna study (run or resumed until it holds ``cfg.trials``)."""
    if cfg.force and cfg.storage is None and (out / "optuna.db").exists():
        try:
            optuna.delete_study(study_name=name, storage=f"sqlite:///{(out / 'optuna.db').resolve()}")
        except KeyError:
            pass  # no such study yet

    def fn(config):
        r = ev.evaluate(config)
        return r.value, r.loss

    so.log(
        f"[search] Optuna study {name!r}: {cfg.trials} trials ({cfg.optuna_sampler}, over the budget: "
        f"{cfg.optuna_infeasible})",
        cfg.progress,
    )
    study = run_study(
        space,
        fn,
        constraints=cons,
        storage=cfg.storage,
        out_dir=out,
        study_name=name,
        n_trials=cfg.trials,
        sampler=cfg.optuna_sampler,
        seed=cfg.seed,
        seeds=seeds,
        progress=cfg.progress,
        direction="maximize" if ev.metric.higher_is_better else "minimize",
        # the default SQLite file lies in --out, whose lock this run holds: a RUNNING trial there was killed
        reclaim_running=cfg.storage is None,
        infeasible=cfg.optuna_infeasible,
    )
    return [
        ilp._row(space, np.asarray(t.unit_choice), source="optuna", trial=int(t.trial))
        for _, t in study_trials_frame(study, space).iterrows()
    ]


def tabulate(rows: list[dict], space: ilp.SearchSpace, ev: Evaluator, cons: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(candidates: every (config, source) row, distinct configs with on_front/fits), scores from the evaluator.

    Score columns are named by the metric: ``accuracy``/``accuracy_se`` or ``bits_per_byte``/``bits_per_byte_se``
    (plus ``loss`` in nats and ``metric``, the column's name); the front is taken in the metric's direction.
    """
    m = ev.metric
    cand = pd.DataFrame(rows)
    res = {d: ev.evaluate(space.config(uc), save=False) for d, uc in zip(cand.digest, cand.unit_choice, strict=True)}
    ev.save()
    cand[m.name] = [res[d].value for d in cand.digest]
    cand[m.se_col] = [res[d].se for d in cand.digest]
    cand["loss"] = [res[d].loss for d in cand.digest]
    cand["metric"] = m.name
    if "pick_at" not in cand:
        cand["pick_at"] = None
    cand.insert(0, "config_id", cand["digest"].str[:10])
    # one row per distinct config (first source wins: uniform labels are kept; earlier picks keep their folder)
    prio = {"uniform": 0, "ilp": 1, "optuna": 2}
    uniq = (
        cand.assign(_p=cand.source.map(prio))
        .sort_values(["_p"], kind="stable")
        .drop_duplicates("digest")
        .drop(columns="_p")
    )
    picks = cand.dropna(subset=["pick_at"]).drop_duplicates("digest").set_index("digest").pick_at
    uniq["pick_at"] = uniq.digest.map(picks)
    uniq["sources"] = [",".join(sorted(set(cand.source[cand.digest == d]))) for d in uniq.digest]
    uniq["on_front"] = pareto_mask(uniq.bitops.to_numpy(), m.oriented(uniq[m.name]))
    uniq["fits"] = [all(c.holds(r[c.metric]) for c in cons) for _, r in uniq.iterrows()]
    return cand, uniq.sort_values("bitops").reset_index(drop=True)


def pick(uniq: pd.DataFrame, metric: Metric = METRICS["accuracy"]) -> pd.Series:
    """The best config (highest accuracy, lowest bits per byte) within every budget (ties: fewer BitOPs, then the
    lower proxy objective)."""
    feas = uniq[uniq.fits]
    if feas.empty:  # cannot happen: the ILP optimum at the budget is feasible
        raise ilp.InfeasibleError("no evaluated config meets the budget")
    order = ["bitops", "objective"]
    return feas.sort_values([metric.name, *order], ascending=[not metric.higher_is_better, True, True]).iloc[0]


def search(cfg: SearchConfig, inputs: Inputs, budgets: list[Budget], device) -> dict:
    """Candidates → validation scores → the pick → its one test score → outputs; returns the summary."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    inputs.model.to(device)
    space = _space(cfg, inputs)
    cons = [ilp.constraint_from_budget(b) for b in budgets]
    data = SplitLoader(cfg, inputs)
    ev = make_evaluator(cfg, inputs, data, device, out)
    rows, seeds = ilp_candidates(cfg, space, cons)
    rows += earlier_picks(out, space, inputs)
    configs = {r["digest"]: space.config(r["unit_choice"]) for r in rows}
    so.log(
        f"[search] {space.n_units} units × {len(space.choices)} choices; evaluating {len(configs)} ILP/uniform/"
        f"earlier configs ({sum(ev.cached(c) is None for c in configs.values())} new)",
        cfg.progress,
    )
    ev.evaluate_many(list(configs.values()), progress=cfg.progress, desc="evaluate")
    if not cfg.no_optuna and cfg.trials > 0:
        rows += optuna_candidates(cfg, space, cons, ev, study_name(cfg, inputs, space, ev, budgets), seeds, out)
    cand, uniq = tabulate(rows, space, ev, cons)
    best = pick(uniq, ev.metric)
    chosen = space.config(cand.unit_choice[cand.digest == best.digest].iloc[0])
    test = ev.score(chosen, data.test())
    val_info, test_info = data.info(int(ev.evaluate(chosen).n), test.n)
    scores = {
        "metric": {"name": ev.metric.name, "higher_is_better": ev.metric.higher_is_better, "label": ev.metric.label},
        "validation": so.split_score(ev.evaluate(chosen), val_info, selected_on=True, n_candidates=len(uniq)),
        "test": so.split_score(test, test_info, selected_on=False),
        "bn": ev.bn_info(),
    }
    return write_outputs(cfg, inputs, budgets, space, ev, cand, uniq, best, chosen, scores, t0)


def bn_text(bn: dict) -> str:
    """How BN was handled, in words."""
    if bn["mode"] == "none":
        return "none: " + bn.get("note", "the model has no BatchNorm")
    if bn["mode"] == "recal":
        return f"re-calibrated per config on {bn['calibration_images']} calibration images (train subset)"
    return "stored statistics (Transitional BN / per-bit entries), not re-calibrated"


def onnx_export(deploy: Path, folder: Path, shape) -> str:
    """model.onnx beside deploy.pt (converted from it: the integers and BN statistics that were scored)."""
    if importlib.util.find_spec("onnx") is None:
        return "not written: install hasb[onnx] (onnx, onnxruntime) for model.onnx"
    try:
        deployment_to_onnx(deploy, folder / "model.onnx", torch.zeros(1, *shape))
    except HasbError as e:
        return f"not written: {e}"
    return "model.onnx: QuantizeLinear/Clip/DequantizeLinear around each quantized layer, int8 weights (opset 13)"


def tool_exports(model, chosen: BitConfig, folder: Path, deploy: Path) -> tuple[dict | None, dict[str, str]]:
    """HAWQ's bit_config dict (or None), nncf_config.json and model.onnx in ``folder``; notes say what each is."""
    notes = {}
    try:
        hawq = formats.hawq_bit_config(model, chosen)
        notes["hawq"] = "per-quantizer bits: HAWQ's q_resnet names for resnet18, hasb's quant_<layer> names elsewhere"
    except formats.FormatError as e:
        hawq, notes["hawq"] = None, f"not written: {e}"
    shape = getattr(model, "example_input_shape", None)
    if shape is None:
        notes["nncf"] = "not written: the model has no example_input_shape (build it with hasb.models.build_model)"
        return hawq, notes
    if callable(getattr(model, "example_input", None)):  # token-id inputs (the byte LMs), not float tensors
        notes["nncf"] = notes["onnx"] = "not written: the model takes token ids; these exports describe float inputs"
        return hawq, notes
    nncf = formats.nncf_config(model, chosen, shape)
    atomic_write_text(folder / "nncf_config.json", json.dumps(nncf, indent=2))
    notes["nncf"] = "nncf_config.json: NNCF's manual precision config (weights only; NNCF keeps 8-bit activations)"
    notes["onnx"] = onnx_export(deploy, folder, shape)
    return hawq, notes


def write_document(
    cfg: SearchConfig,
    inputs: Inputs,
    budgets,
    binds: bool,
    space,
    best,
    chosen: BitConfig,
    scores: dict,
    folder: Path,
    deploy: Path,
) -> Path:
    """config.json of the pick: its config, costs, validation and test scores (with SEs) and provenance."""
    spec = get_spec(inputs.model)
    hawq, notes = tool_exports(inputs.model, chosen, folder, deploy)
    metrics = {k: float(best[k]) for k in (*sx.COST_KEYS, scores["metric"]["name"], "loss")}
    doc = sx.make_document(
        model_name=inputs.model_name,
        build=build_record(inputs.model),
        bits=spec.bits,
        config=chosen,
        fixed={n: ("fp" if spec.fixed_bit is None else spec.fixed_bit) for n in spec.fixed},
        metrics=metrics,
        budgets=budgets,
        budget_binds=binds,
        source=str(best.source),
        provenance={
            "sensitivity_fingerprint": inputs.sensitivity.get("fingerprint"),
            "checkpoint_sha256": inputs.checkpoint_sha,
            "hasb_version": hasb.__version__,
            "command": cfg.command,
            "demo": inputs.demo,
            "objective": space.objective_name,
            "bn": cfg.bn,
            "data": inputs.data,
        },
        integer_checkpoint=deploy.name,
        scores=scores,
        metric=scores["metric"],
        weight_only_act=spec.act_bit if spec.weight_only else "tied",
        hawq_bit_config=hawq,
        tool_notes=notes,
    )
    return sx.write(doc, folder / "config.json")


def _budget_binds(space, budgets) -> bool:
    """Whether some budget binds: an equality, or a limit below the largest value of its metric in ``space``."""
    return any(
        space.metric_range(c.metric)[1] > c.limit * (1 + 1e-12) or c.equality
        for c in (ilp.constraint_from_budget(b) for b in budgets)
    )


def _chosen_summary(best, scores: dict) -> dict:
    """The summary's ``chosen`` entry: the pick's id, config, source, costs, validation and test scores (keys named
    by the metric: ``accuracy``, ``accuracy_se``, ``test_accuracy`` or ``bits_per_byte`` ...)."""
    name = scores["metric"]["name"]
    return {
        "config_id": best.config_id,
        "config": best.config,
        "source": best.source,
        "metric": name,
        **{
            k: float(best[k])
            for k in ("bitops", "gbitops", "avg_bit_equivalent", "effective_bits", "size_bytes", name, f"{name}_se")
        },
        "loss": float(best["loss"]),
        f"test_{name}": scores["test"][name],
        "test_se": scores["test"]["se"],
    }


def write_outputs(
    cfg: SearchConfig,
    inputs: Inputs,
    budgets,
    space,
    ev: Evaluator,
    cand: pd.DataFrame,
    uniq: pd.DataFrame,
    best,
    chosen: BitConfig,
    scores: dict,
    t0: float,
) -> dict:
    """Two output sets (hasb.outset: staged, renamed in, manifest last), so a crash leaves each one old or new:
    the budget's folder (config.json, deploy.pt, model.onnx, nncf_config.json, table.csv, pareto.png/svg), then
    the shared tables at the top of ``out`` (pareto.csv, candidates.csv; their manifest names the budget folder)."""
    out = Path(cfg.out)
    folder = out / so.budget_dir_name(budgets)
    binds = _budget_binds(space, budgets)
    uniq["chosen"] = uniq.digest == best.digest
    with outset.staged_set(folder, SET_MANIFEST) as st:
        staged = _write_budget_set(cfg, inputs, budgets, binds, space, ev, uniq, best, chosen, scores, st.path)
    with outset.staged_set(out, SET_MANIFEST) as st:
        staged.update(so.write_shared(st.path, cand, uniq))
        st.meta["budget_folder"] = folder.name
    paths = {k: (out if k in ("pareto_csv", "candidates_csv") else folder) / p.name for k, p in staged.items()}
    summary = {
        "model": inputs.model_name,
        "demo": inputs.demo,
        "budget": [b.text for b in budgets],
        "budget_binds": binds,
        "folder": str(folder),
        "folder_name": folder.name,
        "chosen": _chosen_summary(best, scores),
        "scores": scores,
        "bn": bn_text(scores["bn"]),
        "metric": ev.metric.name,
        "monotone": so.monotone_note(uniq, folder.name),
        "n_candidates": int(len(uniq)),
        "n_front": int(uniq.on_front.sum()),
        "n_evaluated_now": ev.n_evaluated,
        "paths": {k: str(v) for k, v in paths.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if not binds:
        summary["note"] = f"the budget does not bind: every config fits; picked the best {ev.metric.label} overall"
    so.print_table(
        uniq, best, summary, budgets, ev.metric, file=sys.stderr if cfg.json else sys.stdout, quiet=not cfg.progress
    )
    return summary


def _write_budget_set(
    cfg: SearchConfig, inputs: Inputs, budgets, binds: bool, space, ev, uniq, best, chosen, scores, stage: Path
) -> dict[str, Path]:
    """The budget folder's files, written into its stage folder; returns their staged paths by summary key."""
    with ev.calibrated(chosen) as scored:  # the BN statistics the score used, not the stored ones
        deploy = sx.export_integer(
            scored, chosen, stage / "deploy.pt", extra={"source": "search.pareto", "scores": scores}
        )
    paths = {
        "config": write_document(cfg, inputs, budgets, binds, space, best, chosen, scores, stage, deploy),
        "integer_checkpoint": deploy,
        "table_csv": so.write_table(stage, uniq),
    }
    paths["plot_png"], paths["plot_svg"] = so.plot(
        uniq, best, scores["test"], budgets, inputs.cost, stage, inputs.model_name, scores["validation"], ev.metric
    )
    return paths


def recover_outputs(out: Path) -> None:
    """On start, under the lock on ``out``: finish or drop the output sets a killed run left half-written (the
    shared tables at the top, each budget folder) and remove temp files of interrupted atomic writes."""
    for folder in [out, *sorted(p for p in out.glob("budget-*") if p.is_dir())]:
        outset.recover(folder)


__all__ = [
    "SearchConfig",
    "run_search",
    "search",
    "prepare",
    "validate_config",
    "with_defaults",
    "DEFAULT_OUT",
    "tabulate",
    "pick",
]
