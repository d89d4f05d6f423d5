"""hasb search: exact ILP and Optuna bit-config search, sub-net evaluation, the Pareto front, exports, pipelines.

Front door: ``python -m search.pareto --budget 3.5`` (built-in demo) or
``python -m search.pareto --budget 3.5 --checkpoint RUN/model.pt --sensitivity RUN/sensitivity.json``.
Library: ``search.pipeline.run_search(SearchConfig(budget=["3.5"], checkpoint=...))``.

Modules (each imports only the ones listed above it, and hasb/analysis):
    search.front          pareto_mask, pareto_front, hypervolume (pure math)
    search.ilp            SearchSpace/build_space, Constraint, solve, k_best, frontier, sweep, tied_groups
    search.evaluate       Evaluator (BN re-calibration, cached accuracy/loss of any config, binomial SE)
    search.optuna_search  run_study (multi-objective Optuna; SQLite / PostgreSQL / journal storage)
    search.export         versioned config JSON (+ bit_config, bitwidth_per_scope), validate, load, export_integer
    search.inputs         Inputs (supernet, cost model, sensitivity, data) and budgets, validated
    search.recipes        training recipes: multi-precision → sensitivity → HASB supernet (python -m search.recipes)
    search.demo           the cached small_cnn / Fashion-MNIST demo (built with search.recipes)
    search.outputs        per-budget folders, shared tables, the printed table, split scores
    search.pipeline       SearchConfig and run_search: the whole search as one library call
    search.pareto         the CLI (python -m search.pareto)
"""
