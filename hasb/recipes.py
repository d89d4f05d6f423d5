"""Alias kept for ``python -m hasb.recipes``: the recipes live in :mod:`search.recipes`.

The recipes chain training (hasb) → sensitivity (analysis) → supernet, so they belong to the search layer. This
module is the ONE upward import from hasb into search, whitelisted in the import-linter contract, and exists only
so the documented command and ``from hasb.recipes import ...`` keep working; new code imports search.recipes.
"""

from __future__ import annotations

import sys

from search.recipes import (
    _done,
    cpu_small,
    demo_recipe,
    gpu_recipe,
    gpu_resnet20,
    lm_cpu,
    lm_gpu,
    lm_recipe,
    main,
    measured,
    run_named,
    run_recipe,
    sensitivity_for,
)

__all__ = [
    "cpu_small",
    "gpu_resnet20",
    "run_recipe",
    "demo_recipe",
    "gpu_recipe",
    "lm_cpu",
    "lm_gpu",
    "lm_recipe",
    "measured",
    "sensitivity_for",
    "run_named",
    "main",
    "_done",
]

if __name__ == "__main__":
    sys.exit(main())
