"""search.ilp against brute-force enumeration on small random instances, and on real cost models."""

import itertools

import numpy as np
import pytest

import hasb
from hasb.models import build_model
from search import ilp
from tests.support.fakes import synthetic_space

BITS = (8, 6, 4, 2)


def random_space(seed, L=None, tied_wa=True, groups=None):
    """A random small instance (2–6 layers unless L is given); the generator lives in tests.support.fakes."""
    L = L or int(np.random.default_rng(seed).integers(2, 7))
    return synthetic_space(seed, n_layers=L, bits=BITS, tied_wa=tied_wa, groups=groups)


def brute(space):
    """All unit choices [N, U] with objective [N] and metrics {name: [N]}."""
    U, C = space.n_units, len(space.choices)
    X = np.array(list(itertools.product(range(C), repeat=U)))
    uo = space.unit_matrix(space.objective)
    obj = uo[np.arange(U), X].sum(axis=1)
    mets = {k: space.offsets[k] + space.unit_matrix(m)[np.arange(U), X].sum(axis=1) for k, m in space.metrics.items()}
    return X, obj, mets


def feasible_mask(mets, cons):
    ok = np.ones(len(next(iter(mets.values()))), bool)
    for c in cons:
        v = mets[c.metric]
        ok &= np.isclose(v, c.limit, rtol=1e-9) if c.equality else v <= c.limit * (1 + 1e-12)
    return ok


def brute_pareto(m, obj):
    """Brute-force Pareto set [(metric, objective)], metric ascending: point i survives unless some j costs no more
    (metric values within a relative 1e-9 are equal: round-off of the summation order) and is strictly better."""
    tol = 1e-9 * np.maximum(np.abs(m), 1.0)
    dominated = ((m[None, :] <= (m + tol)[:, None]) & (obj[None, :] < obj[:, None] - 1e-12 * np.abs(obj).max())).any(1)
    return sorted(zip(m[~dominated], obj[~dominated], strict=True))


def budgets_for(space, metric, rng, n=4):
    lo, hi = space.metric_range(metric)
    return lo + (hi - lo) * rng.random(n)


CASES = ["bitops", "size_bytes", "plain_avg_bits", "plain_eq", "bitops+size"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", range(4))
def test_milp_equals_brute_force(case, seed):
    rng = np.random.default_rng(100 + seed)
    space = random_space(seed)
    X, obj, mets = brute(space)
    for _ in range(3):
        if case == "plain_eq":
            # reachable equality targets: plain averages that some config hits exactly
            target = float(rng.choice(np.unique(np.round(mets["plain_avg_bits"], 9))))
            cons = [ilp.Constraint("plain_avg_bits", target, equality=True)]
        elif case == "bitops+size":
            cons = [
                ilp.Constraint("bitops", budgets_for(space, "bitops", rng, 1)[0]),
                ilp.Constraint("size_bytes", budgets_for(space, "size_bytes", rng, 1)[0]),
            ]
        else:
            cons = [ilp.Constraint(case, budgets_for(space, case, rng, 1)[0])]
        ok = feasible_mask(mets, cons)
        if not ok.any():
            with pytest.raises(ilp.InfeasibleError, match="feasible range"):
                ilp.solve(space, cons)
            continue
        sol = ilp.solve(space, cons)
        assert sol.objective == pytest.approx(obj[ok].min(), rel=1e-9, abs=1e-12)
        for c in cons:  # budgets respected, recomputed independently of the solver
            assert c.holds(sol.metrics[c.metric])


@pytest.mark.parametrize("metric", ["bitops", "size_bytes", "plain_avg_bits"])
@pytest.mark.parametrize("seed", range(3))
def test_frontier_is_exact_pareto_set(metric, seed):
    space = random_space(10 + seed, L=5)
    X, obj, mets = brute(space)
    m = mets[metric]
    pts = brute_pareto(m, obj)
    fr = ilp.frontier(space, metric)
    assert len(fr) == len(pts)
    np.testing.assert_allclose(fr.metric_values, [p[0] for p in pts], rtol=1e-12)
    np.testing.assert_allclose(fr.objective_values, [p[1] for p in pts], rtol=1e-9)
    for i in range(len(fr)):  # recovered configs really have those values
        ev = space.evaluate(fr.unit_choice(i))
        assert ev[metric] == pytest.approx(fr.metric_values[i], rel=1e-12)
        assert ev["objective"] == pytest.approx(fr.objective_values[i], rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_sweep_frontier_equals_milp_and_brute(seed):
    space = random_space(20 + seed, L=6)
    X, obj, mets = brute(space)
    budgets = ilp.budget_grid(space, 15)
    a = ilp.sweep(space, budgets, method="frontier", dedupe=False).set_index("budget")
    b = ilp.sweep(space, budgets, method="milp", dedupe=False).set_index("budget")
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-9)
    for bud, row in a.iterrows():
        assert row.objective == pytest.approx(obj[mets["bitops"] <= bud * (1 + 1e-12)].min(), rel=1e-9)
        assert row.bitops <= bud * (1 + 1e-9)
    d = ilp.sweep(space, budgets)
    assert d.digest.is_unique and len(d) <= len(a)


@pytest.mark.parametrize("seed", range(4))
def test_k_best_distinct_ordered_equal_brute_topk(seed):
    rng = np.random.default_rng(seed)
    space = random_space(30 + seed, L=4)
    X, obj, mets = brute(space)
    limit = budgets_for(space, "bitops", rng, 1)[0]
    cons = [ilp.Constraint("bitops", limit)]
    ok = feasible_mask(mets, cons)
    k = 6
    assert ok.any(), "a budget inside [lowest, highest] BitOPs always admits the all-lowest config"
    sols = ilp.k_best(space, cons, k)
    assert len(sols) == min(k, ok.sum())
    assert len({s.key() for s in sols}) == len(sols)
    objs = [s.objective for s in sols]
    assert objs == sorted(objs)
    np.testing.assert_allclose(objs, np.sort(obj[ok])[: len(sols)], rtol=1e-9)
    assert [s.rank for s in sols] == list(range(len(sols)))
    assert all(s.metrics["bitops"] <= limit * (1 + 1e-9) for s in sols)


def test_k_best_exhausts_small_space_without_leaking():
    space = random_space(7, L=2)  # 16 configs
    X, obj, mets = brute(space)
    sols = ilp.k_best(space, [], 40)
    assert len(sols) == 16 and len({s.key() for s in sols}) == 16
    # cuts from one query do not affect the next: a fresh query still finds the optimum
    assert ilp.solve(space, []).objective == pytest.approx(obj.min())
    budgets = ilp.budget_grid(space, 6)
    df = ilp.sweep(space, budgets, k=3, method="milp", dedupe=False)
    for bud, g in df.groupby("budget"):
        ok = mets["bitops"] <= bud * (1 + 1e-12)
        np.testing.assert_allclose(g.sort_values("rank").objective, np.sort(obj[ok])[: len(g)], rtol=1e-9)


def test_tied_groups_and_untied_pairs_brute_force():
    space = random_space(3, L=5, tied_wa=False, groups=[["l0", "l3"], ["l3", "l4"]])
    assert space.units == [[0, 3, 4], [1], [2]]
    assert len(space.choices) == 16
    X, obj, mets = brute(space)
    lim = np.quantile(mets["bitops"], 0.3)
    sol = ilp.solve(space, [ilp.Constraint("bitops", lim)])
    assert sol.objective == pytest.approx(obj[mets["bitops"] <= lim].min(), rel=1e-9)
    cfg = sol.config(space)
    assert cfg["l0"] == cfg["l3"] == cfg["l4"]
    fr = ilp.frontier(space)
    i = fr.best_index(lim)
    assert fr.objective_values[i] == pytest.approx(sol.objective, rel=1e-9)


def test_infeasible_budget_states_range():
    space = random_space(1, L=3)
    lo, hi = space.metric_range("bitops")
    with pytest.raises(ilp.InfeasibleError, match=r"feasible range: BitOPs"):
        ilp.solve(space, [ilp.Constraint("bitops", lo * 0.99)])
    assert ilp.solve(space, [ilp.Constraint("bitops", lo)]).metrics["bitops"] == pytest.approx(lo)
    # a budget above the largest config: the unconstrained optimum (the top choice everywhere here)
    assert ilp.solve(space, [ilp.Constraint("bitops", hi * 10)]).objective == pytest.approx(brute(space)[1].min())
    with pytest.raises(hasb.BudgetError):
        ilp.Constraint("bitops", float("nan"))


@pytest.fixture(scope="module")
def resnet20():
    m = hasb.quantize_model(build_model("resnet20"))
    return m, hasb.CostModel.from_model(m)


def test_linearized_costs_match_cost_model(resnet20):
    m, cm = resnet20
    rng = np.random.default_rng(0)
    names = cm.names
    om = {n: {str(b): float(rng.random()) for b in BITS} for n in names}
    for tied in (True, False):
        space = ilp.build_space(cm, sensitivity={"omega": om}, tied_wa=tied)
        for _ in range(5):
            uc = rng.integers(0, len(space.choices), space.n_units)
            cfg = space.config(uc)
            ev = space.evaluate(uc)
            assert ev["bitops"] == pytest.approx(cm.bitops(cfg), rel=1e-12)
            assert ev["size_bytes"] == pytest.approx(cm.size_bytes(cfg), rel=1e-12)
            assert ev["plain_avg_bits"] == pytest.approx(cm.plain_avg_bits(cfg), rel=1e-12)
            assert ev["avg_bit_equivalent"] == pytest.approx(cm.avg_bit_equivalent(cfg), rel=1e-12)
            assert (space.unit_choice_of(cfg) == uc).all()


def test_resnet_tied_groups_and_budgets(resnet20):
    m, cm = resnet20
    groups = ilp.tied_groups(m)
    assert ["layer2.0.conv1", "layer2.0.shortcut"] in groups and ["layer3.0.conv1", "layer3.0.shortcut"] in groups
    assert len(groups) == 2
    r18 = hasb.quantize_model(build_model("resnet18"))
    assert ["layer2.0.conv1", "layer2.0.downsample.0"] in ilp.tied_groups(r18)
    rng = np.random.default_rng(1)
    om = {n: {str(b): float(rng.lognormal()) * 4.0**-b for b in BITS} for n in cm.names}
    space = ilp.build_space(cm, sensitivity={"omega": om}, groups=groups)
    for text, kind in [("3.5", None), ("0.2GBOPs", None), ("0.15MB", None), ("3", "plain_avg")]:
        try:
            b = cm.parse_budget(text, kind)
        except hasb.BudgetError:
            continue
        sol = ilp.solve(space, [b])
        assert cm.within(sol.config(space), b)
    with pytest.raises(hasb.BudgetError, match="feasible"):
        cm.parse_budget("1.5")
    # paper objective: maximise Σ t·b under the plain average equality
    sens = {"layers": [{"layer": n, "trace_per_param": float(rng.normal())} for n in cm.names]}
    sp = ilp.build_space(cm, sensitivity=sens, objective="paper")
    sol = ilp.solve(sp, [ilp.Constraint("plain_avg_bits", 5.0, equality=True)])
    assert cm.plain_avg_bits(sol.config(sp)) == pytest.approx(5.0)
    tpp = np.array([d["trace_per_param"] for d in sens["layers"]])
    w = np.array([sol.config(sp)[n][0] for n in cm.names])
    # optimality by exchange argument: moving 2 bits from a lower-t to a higher-t layer never helps
    for i in range(len(w)):
        for j in range(len(w)):
            if tpp[i] > tpp[j] and w[i] < 8 and w[j] > 2:
                pytest.fail(f"layer {i} (t={tpp[i]:.3f}) at {w[i]} while layer {j} (t={tpp[j]:.3f}) at {w[j]}")


def test_empty_space_errors():
    with pytest.raises(ilp.SearchError, match="empty search space"):
        ilp.SearchSpace(
            layers=[],
            choices=[(8, 8)],
            units=[],
            metrics={},
            offsets={},
            objective=np.zeros((0, 1)),
            allowed=np.zeros((0, 1), bool),
        )
    with pytest.raises(ilp.SearchError, match="omega"):
        m = hasb.quantize_model(build_model("small_cnn"))
        ilp.build_space(hasb.CostModel.from_model(m), sensitivity={"omega": {}})


# ----------------------------------------------------------------------------------------------------------
# finding 4 (issue 10): budgets a hair below a config's cost, tiny objectives, round-off on frontiers
def just_below(v, rng):
    """A limit 1e-8..5e-6 (relative, log-uniform) below the cost v: inside HiGHS' feasibility tolerance."""
    return float(v - abs(v) * 10 ** rng.uniform(-8, np.log10(5e-6)))


def check_against_brute(space, cons, obj, mets, k=1):
    """The k best under cons equal brute-force enumeration; an empty feasible set raises InfeasibleError."""
    ok = np.ones(len(obj), bool)
    for c in cons:  # the same tolerance as Constraint.holds: a relative 1e-9 is round-off
        ok &= mets[c.metric] <= c.limit + 1e-9 * max(abs(c.limit), 1.0)
    if not ok.any():
        with pytest.raises(ilp.InfeasibleError, match="feasible range"):
            ilp.k_best(space, cons, k)
        return False
    sols = ilp.k_best(space, cons, k)
    np.testing.assert_allclose([s.objective for s in sols], np.sort(obj[ok])[:k], rtol=1e-9, atol=0)
    assert all(c.holds(s.metrics[c.metric]) for s in sols for c in cons)
    return True


@pytest.mark.parametrize("metric", ilp.METRICS)
def test_budget_just_below_an_optimal_config_cost(metric):
    """Old code: 'MILP returned a config violating a constraint' in about a third of these queries, and
    SearchError instead of InfeasibleError below the cheapest config."""
    rng = np.random.default_rng(11)
    feasible = 0
    for seed in range(8):
        space = random_space(200 + seed)
        X, obj, mets = brute(space)
        costs = [p[0] for p in brute_pareto(mets[metric], obj)]  # costs of configs optimal at their budget
        picks = [costs[0], *rng.choice(costs[1:], size=min(4, len(costs) - 1), replace=False)]
        for v in picks:  # costs[0] is the cheapest config: just below it nothing is feasible
            feasible += check_against_brute(space, [ilp.Constraint(metric, just_below(v, rng))], obj, mets)
    assert feasible >= 8 * 3  # the test exercised feasible queries, not only infeasible ones


def test_k_best_and_two_constraints_just_below_costs():
    rng = np.random.default_rng(12)
    for seed in range(6):
        space = random_space(300 + seed, L=4)
        X, obj, mets = brute(space)
        i, j = rng.integers(len(obj), size=2)
        cons = [
            ilp.Constraint("bitops", just_below(mets["bitops"][i], rng)),
            ilp.Constraint("size_bytes", just_below(mets["size_bytes"][j], rng)),
        ]
        check_against_brute(space, cons, obj, mets, k=4)
        check_against_brute(space, cons[:1], obj, mets, k=4)


@pytest.mark.parametrize("seed", range(4))
def test_small_objective_values_solved_exactly(seed):
    """Ω ~ 1e-6: HiGHS' absolute MIP gap (1e-6, fixed in scipy) returned suboptimal configs before rescaling."""
    rng = np.random.default_rng(seed)
    space = random_space(400 + seed, L=5)
    space.objective = space.objective * 1e-6
    X, obj, mets = brute(space)
    for v in rng.choice(mets["bitops"], 4):
        check_against_brute(space, [ilp.Constraint("bitops", float(v))], obj, mets)


def test_resnet20_budgets_just_below_frontier_values(resnet20):
    """Budgets re-used from ResNet-20 frontier values, nudged below: the MILP agrees with the exact frontier."""
    m, cm = resnet20
    rng = np.random.default_rng(3)
    om = {n: {str(b): float(rng.lognormal()) * 4.0**-b for b in BITS} for n in cm.names}
    space = ilp.build_space(cm, sensitivity={"omega": om}, groups=ilp.tied_groups(m))
    for metric in ("bitops", "plain_avg_bits"):
        fr = ilp.frontier(space, metric)
        for v in [*rng.choice(fr.metric_values[1:], 6, replace=False), cm.uniform_bitops(4.0)]:
            lim = just_below(v, rng)
            i = fr.best_index(lim)
            sol = ilp.solve(space, [ilp.Constraint(metric, lim)])
            assert sol.objective == pytest.approx(fr.objective_values[i], rel=1e-9)
            assert sol.metrics[metric] <= lim + 1e-9 * lim
    with pytest.raises(ilp.InfeasibleError, match="feasible range"):
        ilp.solve(space, [ilp.Constraint("bitops", just_below(space.metric_range("bitops")[0], rng))])


def test_frontier_merges_metric_values_equal_within_round_off(resnet20):
    """Plain averages reached in different summation orders (3.9999999999999996 vs 4.0) are one value."""
    m, cm = resnet20
    rng = np.random.default_rng(0)
    om = {n: {str(b): float(rng.lognormal()) * 4.0**-b for b in BITS} for n in cm.names}
    spaces = [ilp.build_space(cm, sensitivity={"omega": om}), random_space(5, L=3)]
    for space in spaces:
        v = ilp.frontier(space, "plain_avg_bits").metric_values
        assert (np.diff(v) > 1e-9 * np.maximum(np.abs(v[1:]), 1.0)).all(), v


def test_pareto_keep_and_value_grid():
    cost = np.array([4.0, 3.9999999999999996, 5.0, 3.0, np.inf])
    obj = np.array([1.0, 2.0, 0.5, 3.0, 0.0])
    assert list(ilp.pareto_keep(cost, obj)) == [3, 0, 2]  # 3.9999999999999996 merged into 4.0's group
    assert ilp.value_grid(np.array([0, -2, -4, -6]) / 20) == pytest.approx(0.1, rel=1e-12)
    assert ilp.value_grid([0.0, 3 * 1024.0, 10 * 1024.0]) == 1024.0
    assert ilp.value_grid(np.random.default_rng(0).random(8)) == 0.0
