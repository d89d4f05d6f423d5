"""One ratio from several runs of the same benchmark on different hosts (issue 15's eager MobileNetV2 target).

Each run of ``quant_overhead --rounds`` prints a ratio (the geometric mean of its per-round ratios) and a 95%
t-interval over its rounds.  A lent GPU's host differs from call to call, and the eager ratio follows the host, so
one run speaks for one host.  This pools runs by inverse-variance weighting of their log ratios, each run's
standard error read back from its interval (half-width in logs ÷ the t quantile of its rounds − 1 degrees of
freedom), and prints the fixed-effect estimate, Cochran's Q (do the hosts differ by more than their intervals
say?) and the DerSimonian–Laird random-effects estimate, whose interval also carries the spread between hosts.

    python -m benchmarks.pool_runs 1.469:1.408:1.532:24 1.473:1.429:1.518:24 1.474:1.442:1.508:80 \\
        1.425:1.392:1.458:80          # RATIO:LOW:HIGH:ROUNDS per run (benchmarks/RESULTS.md, session 27)
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Run:
    """One run's printed result: ratio and 95% t-interval (unitless, e.g. W4A4 step ÷ float step) over ``rounds``."""

    ratio: float
    low: float
    high: float
    rounds: int

    def log_se(self) -> float:
        """The standard error of log(ratio), from the interval's half-width in logs."""
        t = stats.t.ppf(0.975, self.rounds - 1)
        return (math.log(self.high) - math.log(self.low)) / (2 * t)


@dataclass(frozen=True)
class Pooled:
    """Pooled ratios with 95% normal intervals (ratio, low, high), Cochran's Q on ``df`` degrees of freedom and its
    p-value, and the between-host variance τ² of the log ratios."""

    fixed: tuple[float, float, float]
    random: tuple[float, float, float]
    q: float
    df: int
    p: float
    tau2: float


def _interval(mean: float, se: float) -> tuple[float, float, float]:
    z = stats.norm.ppf(0.975)
    return math.exp(mean), math.exp(mean - z * se), math.exp(mean + z * se)


def pool(runs: list[Run]) -> Pooled:
    """Fixed- and random-effects (DerSimonian–Laird) pooling of the runs' log ratios."""
    if len(runs) < 2:
        raise ValueError("pool needs at least two runs")
    ys = [math.log(r.ratio) for r in runs]
    ws = [r.log_se() ** -2 for r in runs]
    total = sum(ws)
    mean = sum(w * y for w, y in zip(ws, ys, strict=True)) / total
    q = sum(w * (y - mean) ** 2 for w, y in zip(ws, ys, strict=True))
    df = len(runs) - 1
    tau2 = max(0.0, (q - df) / (total - sum(w * w for w in ws) / total))
    wr = [1 / (1 / w + tau2) for w in ws]
    mean_r = sum(w * y for w, y in zip(wr, ys, strict=True)) / sum(wr)
    return Pooled(
        fixed=_interval(mean, total**-0.5),
        random=_interval(mean_r, sum(wr) ** -0.5),
        q=q,
        df=df,
        p=float(stats.chi2.sf(q, df)),
        tau2=tau2,
    )


def parse_run(text: str) -> Run:
    """``RATIO:LOW:HIGH:ROUNDS`` → :class:`Run` (an argparse type: its errors become argparse's, exit 2)."""
    parts = text.split(":")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: expected RATIO:LOW:HIGH:ROUNDS, e.g. 1.47:1.44:1.51:80")
    ratio, low, high, rounds = float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3])
    if not (0 < low <= ratio <= high) or rounds < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: needs 0 < LOW ≤ RATIO ≤ HIGH and ROUNDS ≥ 2")
    return Run(ratio, low, high, rounds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=parse_run, metavar="RATIO:LOW:HIGH:ROUNDS")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("give at least two runs to pool")
    res = pool(args.runs)
    print(f"{len(args.runs)} runs; Cochran's Q = {res.q:.2f} on {res.df} df (p = {res.p:.3f}); tau^2 = {res.tau2:.2e}")
    print("| pooling | ratio | 95% CI |\n|---|---|---|")
    for name, (r, lo, hi) in (("fixed effect", res.fixed), ("random effects", res.random)):
        print(f"| {name} | {r:.3f}x | [{lo:.3f}, {hi:.3f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
