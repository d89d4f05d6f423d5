"""hasb.search: exact ILP and Optuna bit-config search, sub-net evaluation, the Pareto front, exports.

Front door: ``python -m search.pareto --budget 3.5``.
"""
