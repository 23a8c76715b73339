"""``bpmem estimate``: the memory of one step, from autograd's rules alone, with no tensors.

Two figures come from two different arguments (``bpmem.analytic``):

* **Saved activations** follow from what each op stores for backward (PyTorch's
  ``tools/autograd/derivatives.yaml``): ``mm``/``addmm`` keep ``mat1`` (the layer input) when
  the weight needs a gradient; ReLU, Tanh and Sigmoid keep their *output*; GELU keeps its
  *input*; ``log_softmax`` keeps its output and ``nll_loss`` its target and ``total_weight``
  (a 0-dim tensor); ``mse_loss`` keeps its input and target; ``pow`` keeps the weight (a
  parameter, so not counted). A ReLU output that is also the next Linear's input is one
  storage and counts once (``analytic.rules``).

* **Peak bytes** need the order in which storages appear and die, so one step is replayed
  as a ledger of allocations and frees (``analytic.plain_step``).

A strategy then changes the plain step's figures (``StrategyConfig.predict``); a split
strategy predicts each rank (``predict_ranks``). Only ``compile-budget`` needs torch: it asks
the partitioner itself, on meta tensors.
"""

from __future__ import annotations

from bpmem.analytic.plain_step import plain_estimate
from bpmem.figures import Estimate, RankFigures
from bpmem.models.workload import Workload
from bpmem.spec import MLPSpec, StepSpec
from bpmem.strategies.base import SplitConfig

__all__ = ["estimate", "estimate_ranks", "Estimate", "RankFigures"]


def estimate(spec: MLPSpec, step: StepSpec) -> Estimate:
    """Predict every figure (``bpmem.figures.Figures``) for one step of ``spec`` under ``step``.

    Raises ValueError ("field: why; allowed: ...") for a cell the strategy cannot run, and
    for a split strategy, whose figures are per rank (``estimate_ranks``)."""
    plain = plain_estimate(spec, step)
    if step.mode != "train":
        return plain
    step.strategy.check(spec, step)
    return step.strategy.predict(spec, step, plain)


def estimate_ranks(spec: MLPSpec | Workload, step: StepSpec) -> list[RankFigures]:
    """Each rank's (or model-parallel stage's) predicted figures under a split strategy. Your
    own model has no arithmetic: its ranks' bytes are None (results.csv leaves them empty),
    and only what the schedule alone sets (the bubble) is given."""
    if not isinstance(step.strategy, SplitConfig):
        raise ValueError(f"strategy: {step.strategy.name} runs on one device; allowed: a split strategy")
    step.strategy.check(spec, step)
    if not isinstance(spec, MLPSpec):
        return step.strategy.schedule_ranks()
    return step.strategy.predict_ranks(spec, step)
