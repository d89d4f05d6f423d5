"""benchmarks/pool_runs.py: runs' intervals read back to standard errors and pooled, against closed forms."""

import math
import random
import statistics

import pytest
from scipy import stats

from benchmarks import pool_runs as P
from benchmarks import quant_overhead as QO


def _run(ratio: float, se: float, rounds: int) -> P.Run:
    """The interval ``quant_overhead`` prints for a log ratio with standard error ``se`` over ``rounds``."""
    t = stats.t.ppf(0.975, rounds - 1)
    return P.Run(ratio, ratio * math.exp(-t * se), ratio * math.exp(t * se), rounds)


@pytest.mark.parametrize("rounds", [5, 24])
def test_standard_error_read_back_from_the_interval_quant_overhead_prints(rounds):
    """The SE of the mean log ratio, from the interval :func:`benchmarks.quant_overhead.ratio_ci` makes of rounds."""
    g = random.Random(rounds)
    base = [g.uniform(20, 30) for _ in range(rounds)]
    ms = [b * 1.45 * math.exp(g.gauss(0, 0.05)) for b in base]
    logs = [math.log(a / b) for a, b in zip(ms, base, strict=True)]
    run = P.Run(*QO.ratio_ci(ms, base), rounds)
    assert run.log_se() == pytest.approx(statistics.stdev(logs) / math.sqrt(rounds), rel=1e-9)


def test_identical_runs_pool_to_the_same_ratio_with_a_sqrt_k_narrower_interval():
    res = P.pool([_run(1.45, 0.02, 40)] * 4)
    assert res.q == pytest.approx(0.0, abs=1e-12) and res.tau2 == 0.0 and res.p == pytest.approx(1.0)
    ratio, low, high = res.fixed
    assert ratio == pytest.approx(1.45) and res.random == pytest.approx(res.fixed)
    assert math.log(high / ratio) == pytest.approx(1.959964 * 0.02 / 2, rel=1e-6)


def test_equal_weights_give_the_geometric_mean_and_spread_hosts_widen_the_random_interval():
    runs = [_run(1.30, 0.01, 40), _run(1.60, 0.01, 40)]
    res = P.pool(runs)
    assert res.fixed[0] == pytest.approx(math.sqrt(1.30 * 1.60))
    # two hosts 0.21 apart in logs with SEs of 0.01: Q = 0.21² / (2 · 0.01²) ≈ 215, far beyond chance
    assert res.q == pytest.approx(math.log(1.6 / 1.3) ** 2 / (2 * 0.01**2), rel=1e-9) and res.p < 1e-6
    assert res.tau2 > 0 and res.random[2] - res.random[1] > 5 * (res.fixed[2] - res.fixed[1])


@pytest.mark.parametrize("bad", [["1.4:1.5:1.6:30", "1.4:1.3:1.5:30"], ["1.4:1.3:1.5"], ["1.4:1.3:1.5:30"]])
def test_bad_runs_are_refused_with_what_is_accepted(bad, capsys):
    """An interval that does not hold its ratio, a missing field, one run alone: argparse's usage and error, exit 2."""
    with pytest.raises(SystemExit) as e:
        P.main(bad)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and ("needs 0 < LOW" in last or "expected RATIO" in last or "two runs" in last)
