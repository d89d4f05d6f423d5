"""Optuna proposals over the budget (issue 14): ilp.repair against a brute-force greedy, and run_study's repair /
skip modes evaluate nothing over the budget, learn from pruned proposals, count COMPLETE trials and resume."""

import itertools
import logging

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from hasb.errors import HasbError
from search import ilp
from search import optuna_search as osr
from search.optuna_search import params_of, proposal_counts, run_study, study_trials_frame, unit_choice_of_params
from tests.support.fakes import synthetic_accuracy, synthetic_space


def _budget(space, frac, metric="bitops"):
    lo, hi = space.metric_range(metric)
    return ilp.Constraint(metric, lo + frac * (hi - lo))


def _brute_greedy(space, uc, cons):
    """Reference repair from the definition: every single unit/choice change scored with ``space.evaluate``; take
    the least increase of Σ Ω per unit of relative budget excess removed (first one on ties) until within budget."""
    uc = [int(c) for c in uc]
    while True:
        ev = space.evaluate(uc)
        if all(c.holds(ev[c.metric]) for c in cons):
            return uc
        best = None
        for u, ch in itertools.product(range(space.n_units), range(len(space.choices))):
            cand = [*uc[:u], ch, *uc[u + 1 :]]
            ev2 = space.evaluate(cand)
            removed = sum((max(ev[c.metric] - c.limit, 0) - max(ev2[c.metric] - c.limit, 0)) / c.limit for c in cons)
            if removed > 0:
                ratio = (ev2["objective"] - ev["objective"]) / removed
                if best is None or ratio < best[0]:
                    best = (ratio, u, ch)
        if best is None:
            return None
        uc[best[1]] = best[2]


@pytest.mark.parametrize(
    "n_layers,groups,metrics",
    [(3, None, ("bitops",)), (4, [["l0", "l2"]], ("bitops",)), (3, None, ("bitops", "size_bytes"))],
)
def test_repair_takes_the_least_omega_increase_per_budget_saved_at_every_step(n_layers, groups, metrics):
    """On 3-unit spaces (one with a tied pair, one under two budgets), from every one of the 4^3 configs and at
    several budgets: ilp.repair ends where the brute-force greedy does, within every budget."""
    n_checked = n_repaired = 0
    for seed in range(3):
        space = synthetic_space(seed, n_layers=n_layers, groups=groups)
        assert space.n_units == 3
        for frac in (0.05, 0.3, 0.6):
            cons = [_budget(space, frac, m) for m in metrics]
            for uc in itertools.product(range(len(space.choices)), repeat=3):
                got = ilp.repair(space, uc, cons)
                want = _brute_greedy(space, uc, cons)
                assert (got is None) == (want is None)
                if got is None:
                    continue
                assert got.tolist() == want, (seed, frac, uc)
                ev = space.evaluate(got)
                assert all(c.holds(ev[c.metric]) for c in cons)
                n_checked += 1
                n_repaired += got.tolist() != list(uc)
    assert n_repaired > 100  # most starting configs were over the budget: the greedy steps were exercised


def test_repair_keeps_a_feasible_config_and_gives_none_below_the_cheapest():
    space = synthetic_space(1, n_layers=5)
    cons = [_budget(space, 0.5)]
    uc = np.array([3, 3, 3, 3, 3])  # all at the lowest bit: within any achievable budget
    assert ilp.repair(space, uc, cons).tolist() == uc.tolist()
    lo, _ = space.metric_range("bitops")
    assert ilp.repair(space, [0] * 5, [ilp.Constraint("bitops", lo * 0.99)]) is None
    # an equality budget is not repaired: the config comes back as it is
    eq = [ilp.Constraint("plain_avg_bits", 3.0, equality=True)]
    assert ilp.repair(space, [0] * 5, eq).tolist() == [0] * 5


def _recording(space, cons, seen):
    def fn(cfg):
        ev = space.evaluate(space.unit_choice_of(cfg))
        seen.append(all(c.holds(ev[c.metric]) for c in cons))
        return synthetic_accuracy(space, cfg), 0.0

    return fn


@pytest.mark.parametrize("mode", ["repair", "skip", "evaluate"])
def test_no_config_over_the_budget_is_evaluated_in_repair_and_skip_modes(mode):
    space = synthetic_space(2, n_layers=8)
    cons = [_budget(space, 0.1)]
    seen: list[bool] = []
    study = run_study(
        space,
        _recording(space, cons, seen),
        constraints=cons,
        storage=optuna.storages.InMemoryStorage(),
        n_trials=15,
        seed=0,
        infeasible=mode,
    )
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert len(complete) == 15 == len(seen)  # n_trials counts evaluations; pruned proposals do not count
    if mode == "evaluate":  # the old mode: most of this tight budget's proposals were evaluated over it
        assert not all(seen) and not pruned
        return
    assert all(seen) and study_trials_frame(study, space).feasible.all()
    assert pruned  # the sampler did propose configs over the budget
    for t in pruned:  # each one really over it, with the excess TPE reads (its constraints) recorded
        assert not cons[0].holds(space.evaluate(unit_choice_of_params(space, t.params))["bitops"])
        assert t.constraints["c0"] > 0 and t.user_attrs["constraint"][0] > 0
    repairs = [t for t in complete if "repair_of" in t.user_attrs]
    if mode == "skip":
        assert not repairs
        return
    assert repairs
    by_number = {t.number: t for t in study.get_trials()}
    for t in repairs:  # the enqueued config is the repair of the pruned proposal it names
        src = by_number[t.user_attrs["repair_of"]]
        assert src.state == TrialState.PRUNED
        fixed = ilp.repair(space, unit_choice_of_params(space, src.params), cons)
        assert t.params == params_of(space, fixed)
    keys = [tuple(sorted(t.params.items())) for t in repairs]
    assert len(set(keys)) == len(keys)  # a repair already evaluated is not enqueued again


def _best_feasible(study, space):
    df = study_trials_frame(study, space)
    return df[df.feasible].value.max() if df.feasible.any() else -np.inf


def test_repair_finds_feasible_configs_where_evaluating_every_proposal_finds_none():
    """The failure of issue 14 on a synthetic space (12 layers, budget 5% above the cheapest config, seeded TPE):
    evaluating every proposal spends all 40 trials over the budget; with repair all 40 are within it, and at a
    looser budget (25% of the range) where the old mode does find some, repair's best is at least as good."""
    space = synthetic_space(0, n_layers=12)
    for frac, old_finds_some in ((0.05, False), (0.25, True)):
        cons = [_budget(space, frac)]
        best, share = {}, {}
        for mode in ("evaluate", "repair"):
            study = run_study(
                space,
                lambda c: (synthetic_accuracy(space, c), 0.0),
                constraints=cons,
                storage=optuna.storages.InMemoryStorage(),
                n_trials=40,
                seed=0,
                infeasible=mode,
            )
            df = study_trials_frame(study, space)
            assert len(df) == 40
            best[mode], share[mode] = _best_feasible(study, space), df.feasible.mean()
        assert (share["evaluate"] > 0) == old_finds_some
        assert share["repair"] == 1.0
        assert best["repair"] >= best["evaluate"] and np.isfinite(best["repair"])


def test_resume_in_repair_mode_loses_no_trial_and_evaluates_nothing_over_the_budget(tmp_path):
    space = synthetic_space(0, n_layers=6)
    cons = [_budget(space, 0.2)]
    seeds = [s.unit_choice for s in ilp.k_best(space, cons, 2)] + [uc for _, uc in ilp.uniform_choices(space)]
    kw = dict(constraints=cons, out_dir=tmp_path, study_name="s", seeds=seeds, seed=1)
    seen: list[bool] = []
    record = _recording(space, cons, seen)

    def interrupting(cfg):
        if len(seen) == 4:
            raise KeyboardInterrupt  # what Ctrl-C does inside an objective
        return record(cfg)

    with pytest.raises(KeyboardInterrupt):
        run_study(space, interrupting, n_trials=12, **kw)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    before = optuna.load_study(study_name="s", storage=url).get_trials()
    done_before = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    failed = [t for t in before if t.state == TrialState.FAIL]
    assert len(done_before) == 4 and len(failed) == 1
    study = run_study(space, record, n_trials=12, **kw)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 12 and all(seen) and study_trials_frame(study, space).feasible.all()
    assert all(any(t.number == n and t.values == v for t in complete) for n, v in done_before.items())
    assert failed[0].params in [t.params for t in complete]  # the interrupted config was (or is now) evaluated
    assert not study.get_trials(states=(TrialState.RUNNING,))
    # the seeds: each evaluated, or (over the budget) pruned — enqueued once, never again on resume
    for s in seeds:
        states = [t.state for t in study.get_trials() if t.params == params_of(space, s)]
        fits = cons[0].holds(space.evaluate(s)["bitops"])
        assert states and set(states) <= ({TrialState.COMPLETE, TrialState.FAIL} if fits else {TrialState.PRUNED})
    n = len(study.get_trials())
    run_study(space, record, n_trials=12, **kw)  # resuming a finished study runs nothing
    assert len(optuna.load_study(study_name="s", storage=url).get_trials()) == n


def test_skip_mode_stops_at_the_cap_with_a_warning(monkeypatch, caplog):
    """A budget only the all-lowest config meets: skipped proposals are capped per missing trial, so the run ends
    (short of n_trials, saying so) instead of spinning."""
    space = synthetic_space(0, n_layers=6)
    lo, _ = space.metric_range("bitops")
    monkeypatch.setattr(osr, "MAX_PRUNED_PER_TRIAL", 2)
    with caplog.at_level(logging.WARNING, logger="search.optuna_search"):
        study = run_study(
            space,
            lambda c: (synthetic_accuracy(space, c), 0.0),
            constraints=[ilp.Constraint("bitops", lo)],
            storage=optuna.storages.InMemoryStorage(),
            n_trials=5,
            seed=0,
            infeasible="skip",
        )
    trials = study.get_trials()
    n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    n_pruned = sum(t.state == TrialState.PRUNED for t in trials)
    assert n_complete < 5 and 2 * 5 <= n_pruned < 2 * 5 + 5  # the cap, overshot by at most one round
    assert f"{n_complete} of 5 trials complete after {n_pruned} proposals" in caplog.text
    within, proposed = proposal_counts(study)
    assert proposed == len(trials) and within == n_complete
    assert study_trials_frame(study, space).feasible.sum() == n_complete  # its columns also when none completed


def test_unknown_infeasible_mode_is_one_clear_error():
    space = synthetic_space(0, n_layers=3)
    with pytest.raises(HasbError, match="accepted: repair, skip, evaluate"):
        run_study(space, lambda c: (0.0, 0.0), storage=optuna.storages.InMemoryStorage(), infeasible="fix")
