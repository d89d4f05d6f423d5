"""``python -m search.pareto --budget 3.5``: the score-vs-BitOPs front of a supernet and the best config in budget.

The score follows the data's task: accuracy (classification) or bits per byte (language models, lower is better).

A thin CLI: parse → :class:`search.pipeline.SearchConfig` → :func:`search.pipeline.run_search` → exit code
(a user error: one line ``error: ...`` on stderr, exit 2; nothing written).  Without ``--checkpoint`` a built-in
demo (small_cnn on real Fashion-MNIST) is trained and analysed on first use and cached in ``--out``.

Outputs in ``--out`` (default ``runs/demo``): pareto.csv and candidates.csv (shared by every budget), caches
evals.json and optuna.db; per budget in ``--out/budget-<budget>/`` (e.g. ``runs/demo/budget-3.5/``): config.json
(validation score it was selected on and held-out test score, each with its standard error), deploy.pt (the
scored network: ``hasb.export.load_deployment``), table.csv, pareto.png, pareto.svg. The budget folder and the
shared tables are each replaced as one set (:mod:`hasb.outset`, manifest ``search.manifest.json`` written last): a
crash or kill leaves the old set or the new one, and the next run on ``--out`` (under its lock) finishes or drops
what a killed run left.

The Pareto math lives in :mod:`search.front` (re-exported here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence

from hasb.cli import add_options, config_from_args, run_cli

from .front import hypervolume, pareto_front, pareto_mask
from .pipeline import DEFAULT_OUT, SearchConfig, run_search


def build_parser() -> argparse.ArgumentParser:
    """argparse generated from SearchConfig's fields (repeatable budgets added from their field metadata)."""
    p = argparse.ArgumentParser(
        prog="python -m search.pareto",
        description="Search per-layer bits of a trained supernet under BitOPs/size/effective-bits budgets; plot the "
        "accuracy- (or bits-per-byte-) vs-BitOPs front and export the best config in budget, scored once on held-out test "
        "data. Without --checkpoint a built-in demo (small_cnn on Fashion-MNIST) is trained on first "
        f"use and cached in --out (default {DEFAULT_OUT}).",
    )
    for f in dataclasses.fields(SearchConfig):
        if "repeat_help" in f.metadata:
            p.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                action="append",
                default=[],
                help=f.metadata["repeat_help"],
            )
    return add_options(p, SearchConfig)


def config_from_argv(argv: Sequence[str] | None) -> SearchConfig:
    """The SearchConfig of a command line (the command itself recorded for provenance)."""
    args = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(args)
    return config_from_args(
        SearchConfig, ns, command="python -m search.pareto " + " ".join(shlex.quote(a) for a in args)
    )


def _run(cfg: SearchConfig) -> int:
    summary = run_search(cfg)
    if cfg.json:
        print(json.dumps(summary, indent=2))
    elif summary.get("note"):
        print(summary["note"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: _run(config_from_argv(argv)))


__all__ = [
    "main",
    "build_parser",
    "config_from_argv",
    "pareto_mask",
    "pareto_front",
    "hypervolume",
    "SearchConfig",
    "run_search",
]

if __name__ == "__main__":
    raise SystemExit(main())
