"""hasb search: exact ILP and Optuna bit-config search, sub-net evaluation, the Pareto front, exports.

Front door: ``python -m search.pareto --budget 3.5`` (built-in demo) or
``python -m search.pareto --budget 3.5 --checkpoint RUN/model.pt --sensitivity RUN/sensitivity.json``.

Modules:
    search.ilp            SearchSpace/build_space, Constraint, solve, k_best, frontier, sweep, tied_groups
    search.evaluate       Evaluator (BN re-calibration, cached accuracy/loss of any config)
    search.optuna_search  run_study (multi-objective Optuna; SQLite / PostgreSQL / journal storage)
    search.pareto         pareto_mask, pareto_front, run_search, the CLI
    search.export         versioned config JSON (+ bit_config, bitwidth_per_scope), validate, load, export_integer
    search.demo           the cached small_cnn / Fashion-MNIST demo
    search.fakes          stand-in artifacts for tests and benchmarks
"""
