"""Memory strategies: how one step runs, and so what autograd keeps for backward.

Each strategy is one module holding a frozen, typed config (``base.StrategyConfig``) that
validates itself, predicts its figures with arithmetic alone and builds its runtime;
``registry`` lists them by name. This package imports nothing at import time, so that the
analytic layer below it (``bpmem.analytic``) and ``bpmem.spec`` can use ``base``.
"""
