"""Predicting a cell before it runs: no real memory is allocated here.

- ``estimate``: the arithmetic answer (and the dry run's, when torch is there) for one step;
- ``dry_run``: the exact peak by a dry run, where the arithmetic has only an upper estimate;
- ``rank_dry_run``: the same, for each rank of a split strategy;
- ``fit``: the largest batch, or the strategy, that fits a memory budget.
"""
