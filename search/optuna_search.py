"""Black-box multi-objective search with Optuna: the task's metric (accuracy ↑, or bits per byte ↓) and BitOPs ↓
over per-layer bits.

One categorical parameter per unit (a layer, or a tied group), the budget as a
constraint (``constraints_func``: normalised excess of each constrained metric,
≤ 0 feasible), seeded with ILP solutions and uniform configs via
``enqueue_trial`` so the black-box search starts from the exact proxy front.

Sampler: **TPE** (multivariate) by default, chosen by measurement
(``python benchmarks/search.py --only samplers``): on the ResNet-20 search space
(19 units × 4 bits, residual shortcuts tied), budget average-bit 3.5, a noisy
proxy accuracy (exp of the negative Hessian proxy, noise s.d. 0.005), the same
ILP + uniform seeds, 5 sampler seeds each, the normalised hypervolume of the
feasible front was (mean ± s.e.)

    trials   NSGA-II          TPE
    40       0.0846 ± 0.0013  0.1213 ± 0.0098
    80       0.0847 ± 0.0013  0.1433 ± 0.0075
    200      0.1140 ± 0.0109  0.1845 ± 0.0066

NSGA-II spends its first generation (population 38) on random configs, which
under a tight budget are mostly infeasible or dominated by the seeds; TPE
exploits the seeds at once.  TPE costs more per trial (3–5 vs 1.5 ms), which is
negligible next to one sub-net evaluation (seconds).  ``--optuna-sampler nsga2`` remains.

Proposals over the budget (``infeasible``; ``--optuna-infeasible`` of the search CLI), one of INFEASIBLE:

* ``"repair"`` (default): the proposal is not evaluated.  It is told to the study as PRUNED with its
  budget excess recorded, and its repaired config (:func:`search.ilp.repair`: bits lowered greedily, each step
  the change with the least Ω increase per unit of budget excess removed, until within the budget) is
  enqueued as a trial, so it is evaluated with the real metric next — unless that config was tried already.
* ``"skip"``: the same, without the repair.
* ``"evaluate"``: every proposal is evaluated; the budget is only the soft constraint (the old behaviour,
  which at tight budgets spent every evaluation outside the budget: issue 14).

Why PRUNED and not FAIL: Optuna 5's TPESampler builds its densities from COMPLETE and PRUNED trials only (a
FAIL trial is invisible to it, so it would keep proposing the same region), and puts every trial whose
constraint values (``Trial.set_constraint``) are > 0 into its infeasible group, whatever its state: ranked
after all feasible trials, least excess first.  A pruned proposal with its excess is thus learnt from as
"infeasible, this far over the budget".  NSGA-II learns from COMPLETE trials only (it still gets the repairs).
Only inequality budgets are enforced; an equality budget (the paper's plain average) stays a soft constraint.

``n_trials`` counts COMPLETE trials, i.e. evaluations; pruned proposals do not count (trials are run in rounds
of the missing number until the study holds ``n_trials`` COMPLETE ones).  So that a sampler stuck outside the
budget cannot spin forever, a run stops once it has pruned ``MAX_PRUNED_PER_TRIAL`` proposals per trial that was
missing when it started; the study then ends short of ``n_trials`` with a warning (a later run continues it).

Storage: an SQLite file in the run directory by default (``optuna.db``).
Interrupting a run (Ctrl-C) marks the running trial FAIL; the next run with the
same study re-enqueues failed configurations and continues until the requested
number of COMPLETE trials exists, so no trial is lost.  A trial left RUNNING by
a killed run (kill -9) is failed and re-enqueued on the next start: at once when
the caller is the storage's only writer (search's default SQLite file in its
locked --out), else once its heartbeat is older than the grace period (RDB
storages run with a heartbeat, so another worker's live trial is left alone).  Several workers on several machines share one study through
``postgresql://user@host/db`` (RDBStorage) or a journal file on a shared disk
(``journal:/path/study.log``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from hasb.config import BitConfig
from hasb.errors import HasbError

from .ilp import Constraint, SearchError, SearchSpace, _as_constraints, repair

SAMPLERS = ("nsga2", "tpe")
DEFAULT_SAMPLER = "tpe"
INFEASIBLE = ("repair", "skip", "evaluate")
DEFAULT_INFEASIBLE = "repair"
MAX_PRUNED_PER_TRIAL = 20  # sampling a proposal costs milliseconds, one evaluation seconds
HEARTBEAT_S = 10
GRACE_S = 30


class StorageError(HasbError):
    """A storage URL/path that cannot be used."""


ACCEPTED = "accepted: sqlite:///FILE, postgresql://USER@HOST/DB, mysql://..., journal:FILE (or a FILE.log path)"


def _journal_path(s: str) -> str | None:
    """The file of a journal storage spec, or None when ``s`` is not one."""
    if s.startswith("journal:"):
        return s[len("journal:") :]
    return s if s.endswith((".log", ".journal")) and "://" not in s else None


def _check_file_target(path: str, what: str) -> None:
    """A storage file must be a file (or creatable): not a directory, its nearest existing folder writable."""
    if not path:
        raise StorageError(f"{what} names no file; {ACCEPTED}")
    p = Path(path)
    if p.is_dir():
        raise StorageError(f"{what}: {p} is a directory, not a file")
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise StorageError(f"{what}: cannot create {p} ({anc} is not a writable folder)")


def validate_storage(storage: str) -> None:
    """Check a storage spec without creating anything: its kind, and for files that they can be written."""
    s = str(storage)
    jp = _journal_path(s)
    if jp is not None:
        _check_file_target(jp, f"--storage {s}")
    elif "://" not in s:
        raise StorageError(f"storage {s!r} not understood; {ACCEPTED}")
    elif s.startswith("sqlite:///"):
        target = s[len("sqlite:///") :]
        if target != ":memory:":
            _check_file_target(target, f"--storage {s}")
    elif s.startswith("postgresql://"):
        _pg_driver()


def make_storage(storage: str | None, out_dir: str | Path | None = None, heartbeat: bool = True):
    """Storage object from a spec.

    ``None`` → SQLite file ``out_dir/optuna.db``; ``sqlite:///...``, ``postgresql://...``, ``mysql://...`` →
    RDBStorage (with heartbeat); ``journal:PATH`` or a path ending in ``.log``/``.journal`` → JournalStorage on
    a file (multi-process safe without a database server).
    """
    if storage is None:
        if out_dir is None:
            raise StorageError("no storage given and no run directory for the default SQLite file")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{Path(out_dir).resolve() / 'optuna.db'}"
    s = str(storage)
    validate_storage(s)
    jp = _journal_path(s)
    if jp is not None:
        Path(jp).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(jp))
    if s.startswith("postgresql://"):
        s = "postgresql+" + _pg_driver() + s[len("postgresql") :]
    kw = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S} if heartbeat else {}
    err: Exception | None = None
    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeat is "experimental" in Optuna; we rely on it knowingly
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(s, engine_kwargs={"pool_pre_ping": True}, **kw)
        except Exception as e:  # sqlalchemy / driver errors
            err = e
            # workers starting together on a fresh database race to create Optuna's tables; the loser sees
            # a unique violation and succeeds on retry once the winner's schema is committed
            if "IntegrityError" not in type(e).__name__ and "already exists" not in str(e):
                break
            time.sleep(0.2 * (attempt + 1))
    raise StorageError(
        f"cannot open storage {s.split('@')[-1]!r}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    ) from None


# Optuna ≥ 5 reads constraints set on the trial (``Trial.set_constraint``); older ones need constraints_func
_NEW_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


def _pg_driver() -> str:
    """SQLAlchemy ≥ 2.1 defaults ``postgresql://`` to psycopg 3; use whichever driver is installed."""
    for mod, name in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(mod) is not None:
            return name
    raise StorageError("postgresql storage needs a driver: pip install psycopg2-binary (or psycopg)")


def make_sampler(name: str, seed: int | None, constraints_func: Callable | None, n_units: int):
    if _NEW_CONSTRAINTS:
        constraints_func = None
    if name == "nsga2":
        # population ~ 2× the number of decision variables, at least 20: enough diversity for crossover
        return optuna.samplers.NSGAIISampler(
            population_size=max(20, min(50, 2 * n_units)), seed=seed, constraints_func=constraints_func
        )
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, constraints_func=constraints_func, multivariate=True, n_startup_trials=10
        )
    raise ValueError(f"unknown sampler {name!r}; accepted: {', '.join(SAMPLERS)}")


def _constraints_func(ft) -> Sequence[float]:
    return ft.user_attrs.get("constraint", [0.0])


def _choice_label(ch: tuple[int, int]) -> int | str:
    return ch[0] if ch[0] == ch[1] else f"w{ch[0]}a{ch[1]}"


def param_names(space: SearchSpace) -> list[str]:
    return space.unit_names()


def params_of(space: SearchSpace, unit_choice: Sequence[int] | np.ndarray) -> dict:
    names = param_names(space)
    return {n: _choice_label(space.choices[int(c)]) for n, c in zip(names, unit_choice, strict=False)}


def unit_choice_of_params(space: SearchSpace, params: dict) -> np.ndarray:
    lab = {_choice_label(ch): i for i, ch in enumerate(space.choices)}
    return np.array([lab[params[n]] for n in param_names(space)])


def _key(params: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in params.items()))


def _trial_key(t: optuna.trial.FrozenTrial) -> tuple:
    """The config of a trial; a WAITING (enqueued) trial has no params yet, only its fixed ones."""
    return _key(t.params or t.system_attrs.get("fixed_params", {}))


def _tried_keys(study: optuna.Study) -> set[tuple]:
    """Configs of the trials that are evaluated, being evaluated or queued (the ones not to enqueue again)."""
    states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    return {_trial_key(t) for t in study.get_trials(deepcopy=False, states=states)}


def study_trials_frame(study: optuna.Study, space: SearchSpace):
    """COMPLETE trials as rows (trial, value: the first objective (accuracy or the task's metric), gbitops, feasible,
    loss, digest, unit_choice, worker, repair_of: the number of the pruned proposal it repairs, else None);
    ``accuracy`` repeats ``value`` for older readers."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        uc = unit_choice_of_params(space, t.params)
        rows.append(
            {
                "trial": t.number,
                "value": t.values[0],
                "accuracy": t.values[0],
                "gbitops": t.values[1],
                "feasible": all(c <= 0 for c in t.user_attrs.get("constraint", [0.0])),
                "loss": t.user_attrs.get("loss", float("nan")),
                "digest": t.user_attrs.get("digest"),
                "unit_choice": tuple(int(c) for c in uc),
                "worker": t.user_attrs.get("worker"),
                "repair_of": t.user_attrs.get("repair_of"),
            }
        )
    cols = ["trial", "value", "accuracy", "gbitops", "feasible", "loss", "digest", "unit_choice", "worker", "repair_of"]
    # the columns (and a boolean "feasible") also when no trial is complete (skip mode stopped by its cap)
    return pd.DataFrame(rows, columns=cols).astype({"feasible": bool})


def proposal_counts(study: optuna.Study) -> tuple[int, int]:
    """(proposals within every budget, all proposals): the sampler's and the seeds' configs, i.e. COMPLETE and
    PRUNED trials that are not repairs; pruned ones were over the budget (``infeasible`` repair/skip)."""
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    own = [t for t in study.get_trials(deepcopy=False, states=states) if t.user_attrs.get("repair_of") is None]
    within = sum(all(c <= 0 for c in t.user_attrs.get("constraint", [0.0])) for t in own)
    return within, len(own)


def run_study(
    space: SearchSpace,
    evaluate_fn: Callable[[BitConfig], tuple[float, float]],
    *,
    constraints: Iterable = (),
    storage=None,
    out_dir: str | Path | None = None,
    study_name: str = "hasb-search",
    n_trials: int = 50,
    sampler: str = DEFAULT_SAMPLER,
    seed: int | None = 0,
    seeds: Sequence[Sequence[int]] = (),
    worker: str | None = None,
    progress: bool = False,
    direction: str = "maximize",
    reclaim_running: bool = False,
    infeasible: str = DEFAULT_INFEASIBLE,
) -> optuna.Study:
    """Run (or resume, or join) a study until it holds ``n_trials`` COMPLETE trials.

    A trial left RUNNING by a killed process is failed and its configuration re-enqueued before new trials are
    sampled: with ``reclaim_running`` every RUNNING trial (the caller is the storage's only writer, e.g. search
    holding the lock on its ``--out`` with the default SQLite file there); otherwise those whose heartbeat is
    older than the grace period (RDB storages: another worker's live trial is left alone).

    Args:
        space: the search space (units, choices, metrics) from :func:`search.ilp.build_space`.
        evaluate_fn: config -> (metric value, loss); e.g. ``lambda c: (r := ev.evaluate(c)).value, r.loss``.
        constraints: Budgets/Constraints; each contributes (metric − limit)/limit to ``constraints_func``.
        storage: a spec for :func:`make_storage` or an Optuna storage object; None = SQLite in ``out_dir``.
        n_trials: target number of COMPLETE trials in the study (over all workers and runs).
        seeds: unit-choice vectors enqueued once per study (ILP solutions, uniform configs).
        worker: a label recorded on each trial (which process ran it).
        direction: of the metric: ``"maximize"`` (accuracy) or ``"minimize"`` (bits per byte); part of the study,
            so a study is never resumed with the other direction (Optuna refuses that).
        infeasible: what a proposal over an inequality budget gets: ``"repair"``, ``"skip"`` or ``"evaluate"``
            (module docstring); pruned proposals do not count towards ``n_trials``.
    Returns the study.
    """
    if infeasible not in INFEASIBLE:
        raise SearchError(f"unknown infeasible mode {infeasible!r}; accepted: {', '.join(INFEASIBLE)}")
    cons = _as_constraints(constraints)
    if not isinstance(storage, optuna.storages.BaseStorage):
        storage = make_storage(storage, out_dir)
    optuna.logging.set_verbosity(logging.WARNING)
    smp = make_sampler(sampler, seed, _constraints_func, space.n_units)
    study, creator = _create_or_join(study_name, storage, smp, direction)
    reclaim_stale(study, storage, everything=reclaim_running)
    _enqueue_seeds(study, space, seeds, creator)
    objective = _objective(space, evaluate_fn, cons, worker, infeasible)
    _optimize(study, objective, n_trials, 0 if infeasible == "evaluate" else MAX_PRUNED_PER_TRIAL, progress)
    return study


def _count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def _optimize(study: optuna.Study, objective, n_trials: int, per_trial_cap: int, progress: bool) -> None:
    """Run trials until the study holds ``n_trials`` COMPLETE ones (over all workers), in rounds of the missing
    number: a pruned proposal does not count, so a round that pruned some is followed by one for the shortfall.
    At most ``per_trial_cap`` × the trials missing at the start may be pruned by this call (then a warning)."""
    missing = n_trials - _count(study, TrialState.COMPLETE)
    cap, pruned0 = per_trial_cap * max(missing, 0), _count(study, TrialState.PRUNED)
    cb = optuna.study.MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))
    while missing > 0:
        study.optimize(objective, n_trials=missing, callbacks=[cb], show_progress_bar=progress, gc_after_trial=False)
        missing = n_trials - _count(study, TrialState.COMPLETE)
        pruned = _count(study, TrialState.PRUNED) - pruned0
        if missing > 0 and pruned >= cap:
            logging.getLogger(__name__).warning(
                "Optuna study %r: %d of %d trials complete after %d proposals over the budget were pruned (the cap: "
                "%d per missing trial); run again to continue",
                study.study_name,
                n_trials - missing,
                n_trials,
                pruned,
                per_trial_cap,
            )
            return


def _create_or_join(study_name: str, storage, smp, direction: str) -> tuple[optuna.Study, bool]:
    """(the study, whether this worker created it): the creator seeds it (race-free: names are unique)."""
    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=smp,
            directions=[direction, "minimize"],
            load_if_exists=False,
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=study_name, storage=storage, sampler=smp), False


def reclaim_stale(study: optuna.Study, storage, everything: bool) -> list[int]:
    """Fail the trials a killed process left RUNNING (all of them when ``everything``, else the heartbeat-stale
    ones), so :func:`_enqueue_seeds` re-enqueues their configurations; returns their numbers."""
    if everything:
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in stale:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # Optuna's own fail_stale_trials does this
        return [t.number for t in stale]
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():  # "experimental" in Optuna since 2.9; relied on knowingly, as the heartbeat
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op without a heartbeat
    return sorted(before - {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))})


def _enqueue_seeds(study: optuna.Study, space: SearchSpace, seeds: Sequence[Sequence[int]], creator: bool) -> None:
    """Seeds once per study; failed trials (interrupted or killed) re-enqueued so none is lost."""
    seed_now = creator or not _seeded_by_creator(study)
    trials = study.get_trials(deepcopy=False)
    live = _tried_keys(study)
    todo: list[dict] = []
    if seed_now:
        todo += [params_of(space, s) for s in seeds]
    todo += [dict(t.params) for t in trials if t.state == TrialState.FAIL and t.params]
    for p in todo:
        if _key(p) not in live:
            study.enqueue_trial(p, skip_if_exists=False)
            live.add(_key(p))
    if seed_now:
        study.set_user_attr("seeded", True)


def _seeded_by_creator(study: optuna.Study, wait_s: float = 60.0) -> bool:
    """True once the study's creator has enqueued the seeds (it marks the study last).

    A worker that joins while the creator is still enqueueing waits for the mark instead of seeding a second
    time; only when the mark never comes (the creator died before seeding) does it seed the study itself.
    """
    deadline = time.monotonic() + wait_s
    while not study.user_attrs.get("seeded"):  # read from the storage on each access
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _excess(ev: dict[str, float], cons: Sequence[Constraint]) -> list[float]:
    """Normalised excess (metric − limit)/|limit| of each constraint (≤ 0 feasible; equality: |excess|)."""
    out = [(ev[c.metric] - c.limit) / max(abs(c.limit), 1e-300) for c in cons]
    return [abs(e) if c.equality else e for e, c in zip(out, cons, strict=True)] or [0.0]


def _enqueue_repair(study: optuna.Study, space: SearchSpace, uc: np.ndarray, cons, number: int) -> None:
    """Enqueue the repaired config of proposal ``number`` (over the budget) unless it was tried or queued."""
    fixed = repair(space, uc, cons)
    if fixed is None:  # the budget is below the cheapest config: nothing can be enqueued
        return
    params = params_of(space, fixed)
    if _key(params) not in _tried_keys(study):
        study.enqueue_trial(params, user_attrs={"repair_of": number}, skip_if_exists=False)


def _objective(
    space: SearchSpace,
    evaluate_fn: Callable[[BitConfig], tuple[float, float]],
    cons: Sequence[Constraint],
    worker: str | None,
    infeasible: str = DEFAULT_INFEASIBLE,
) -> Callable[[optuna.Trial], tuple[float, float]]:
    """The trial function: suggest one allowed choice per unit, record the constraint excess, score the config
    (or, over an inequality budget with ``infeasible`` repair/skip, prune it: see the module docstring)."""
    allowed = space.unit_allowed()
    pnames = param_names(space)
    labels = [[_choice_label(space.choices[c]) for c in np.flatnonzero(allowed[u])] for u in range(space.n_units)]
    hard = [c for c in cons if not c.equality] if infeasible != "evaluate" else []

    def objective(trial: optuna.Trial):
        uc = np.array([labels[u].index(trial.suggest_categorical(pnames[u], labels[u])) for u in range(space.n_units)])
        # labels[u] lists allowed choices only: map back to the space's choice index
        uc = np.array([np.flatnonzero(allowed[u])[i] for u, i in enumerate(uc)])
        ev = space.evaluate(uc)
        excess = _excess(ev, cons)
        trial.set_user_attr("constraint", excess)
        if worker is not None:
            trial.set_user_attr("worker", worker)
        if _NEW_CONSTRAINTS:
            for i, e in enumerate(excess):
                trial.set_constraint(f"c{i}", e)
        if not all(c.holds(ev[c.metric]) for c in hard):
            if infeasible == "repair":
                _enqueue_repair(trial.study, space, uc, hard, trial.number)
            raise optuna.TrialPruned(f"over the budget ({infeasible})")  # not evaluated; TPE learns its excess
        cfg = space.config(uc)
        acc, loss = evaluate_fn(cfg)
        trial.set_user_attr("loss", float(loss))
        trial.set_user_attr("digest", cfg.digest())
        return float(acc), ev["bitops"] / 1e9

    return objective
