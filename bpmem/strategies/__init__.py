"""Memory strategies: how the forward runs, and so what autograd keeps for backward.

Each strategy is a small frozen class with a ``forward(model, x)`` and the ``params`` that
go into results.csv's ``strategy_params``. ``make_strategy(spec, step)`` picks one from the
step's ``strategy`` name and parameters (``segments``, ``budget``, ``policy``).

- ``none``: the plain forward.
- ``checkpoint-layer``: every unit (Linear + activation) checkpointed on its own.
- ``checkpoint-segments``: k uniform segments, as ``checkpoint_sequential`` (the last plain).
- ``checkpoint-sqrt``: the same with ceil(sqrt(n)) segments (Chen et al. 2016).
- ``checkpoint-budget``: the DP plan that fits a byte budget with the fewest recomputed FLOPs.
- ``checkpoint-selective``: the whole model in one selective checkpoint: save the matmul
  outputs and recompute activations (``save-matmuls``) or the reverse (``save-activations``).
- ``microbatch``: k micro-batches with gradient accumulation: a smaller batch's activations
  for the same update (the seed's exercise 5 alternative to splitting the model).
- ``compile-budget``: ``torch.compile`` whose min-cut partitioner meets
  ``activation_memory_budget``; see ``bpmem.strategies.compiled``.
"""

from __future__ import annotations

from bpmem.spec import MLPSpec, StepSpec
from bpmem.strategies.checkpointing import (
    MicrobatchStrategy,
    PlainStrategy,
    SegmentStrategy,
    SelectiveStrategy,
    Strategy,
    chain_costs,
    plan_for,
)

__all__ = ["Strategy", "PlainStrategy", "SegmentStrategy", "SelectiveStrategy", "make_strategy", "chain_costs",
           "plan_for"]


def make_strategy(spec: MLPSpec, step: StepSpec) -> Strategy:
    """The runnable strategy for one cell (budget plans depend on the batch size)."""
    if step.strategy == "none":
        return PlainStrategy()
    if step.strategy == "microbatch":
        return MicrobatchStrategy(step.microbatches)
    if step.strategy == "checkpoint-selective":
        return SelectiveStrategy(step.policy)
    if step.strategy == "compile-budget":
        from bpmem.strategies.checkpointing import budget_bytes, loss_bytes
        from bpmem.strategies.compiled import CompiledBudgetStrategy
        from bpmem.strategies.planner import plain_plan

        fraction = step.budget
        if fraction > 1:  # bytes: as a fraction of what the plain step retains
            costs = chain_costs(spec, step.batch_size)
            plain = costs.plan_cost(plain_plan(costs.n))[0] + loss_bytes(spec, step.batch_size)
            fraction = min(1.0, budget_bytes(spec, step) / plain)
        return CompiledBudgetStrategy(fraction)
    return SegmentStrategy(step.strategy, tuple(plan_for(spec, step)))
