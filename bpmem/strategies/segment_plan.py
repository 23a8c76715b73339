"""What the checkpointing strategies that cut the chain into segments share: the prediction
of a segment plan and its runtime.

A subclass says only which plan it runs (``plan``); ``bpmem.analytic.planner`` explains
what a plan retains and recomputes. The peak is an estimate, not a replay: the plain step's
exact peak, less the activations no longer retained, plus the largest recompute working set
(a checkpointed segment's interior boundaries and internals, rebuilt during its backward).
It assumes the peak falls where the plain step's does, so it is an upper estimate when
recomputation happens away from that moment; results.csv carries both figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from bpmem.analytic.planner import Segment, describe
from bpmem.analytic.rules import chain_costs, loss_saved_bytes
from bpmem.figures import Term
from bpmem.strategies.base import StrategyConfig

if TYPE_CHECKING:
    from bpmem.figures import Estimate
    from bpmem.spec import MLPSpec, StepSpec


@dataclass(frozen=True)
class SegmentPlanConfig(StrategyConfig):
    """A strategy that runs a plan of segments, each checkpointed or plain."""

    def plan(self, spec: MLPSpec, batch_size: int) -> list[Segment]:
        """The MLP's plan: by default the plan for its depth + 1 units."""
        return self.plan_units(spec.depth + 1)

    def plan_units(self, units: int) -> list[Segment]:
        """The plan over a chain of ``units`` blocks, where no byte costs are needed."""
        raise NotImplementedError

    def extra_params(self, spec: MLPSpec, batch_size: int) -> dict[str, Any]:
        """Parameters worth recording beyond the plan's shape (a budget in bytes)."""
        return {}

    def check(self, spec: MLPSpec, step: StepSpec) -> None:
        self.plan(spec, step.batch_size)

    def why(self, spec: MLPSpec, plain_terms: dict[str, int], kept: int, plain: int) -> str:
        from bpmem.units import format_bytes

        hidden, x = plain_terms.get("saved: hidden activations", 0), plain_terms.get("saved: input batch X", 0)
        return (f"it keeps only the inputs of its checkpointed segments (the plain step keeps {format_bytes(hidden)} "
                f"of hidden activations and {format_bytes(x)} of X) and recomputes each segment once in backward")

    def predict(self, spec: MLPSpec, step: StepSpec, plain: Estimate) -> Estimate:
        b = step.batch_size
        costs = chain_costs(spec, b)
        plan = self.plan(spec, b)
        chain_bytes, flops = costs.plan_cost(plan)
        retained = chain_bytes + loss_saved_bytes(spec, b)
        working = max((sum(costs.boundary_bytes[seg.start + 1:seg.end]) + sum(costs.internal_bytes[seg.start:seg.end])
                       for seg in plan if seg.checkpointed), default=0)
        params: dict[str, Any] = {"segments": len(plan), "checkpointed": sum(seg.checkpointed for seg in plan),
                                  "plan": describe(plan), **self.extra_params(spec, b)}
        terms = [Term("retained (segment plan)", retained, "sum of segment costs + loss",
                      "checkpointed segment: its input; plain unit: its input and internals (planner.py)")]
        peak = plain.peak_bytes - plain.saved_activation_bytes + retained + working
        return plain.under_strategy(retained, peak, flops, params, terms)

    def runtime(self, spec: MLPSpec, step: StepSpec) -> Any:
        from bpmem.models.mlp import as_workload
        from bpmem.strategies.checkpointing import SegmentStrategy

        workload = as_workload(spec)
        if workload.analytic is not None:
            return SegmentStrategy(self.name, tuple(self.plan(workload.analytic, step.batch_size)), workload.blocks)
        # a user's blocks sit inside the model's own forward, which then runs as written (unless the
        # model is the nn.Sequential of its blocks: then the chain runs segment by segment)
        inside = workload.forward if hasattr(workload, "blocks_path") else None
        found = getattr(workload, "found_blocks", None)
        if self.plans_from_costs:
            return SegmentStrategy(self.name, None, workload.blocks, model_forward=inside,
                                   cost_planner=self.plan_measured, found_blocks=found)
        return SegmentStrategy(self.name, None, workload.blocks, planner=self.plan_units, model_forward=inside,
                               found_blocks=found)

    plans_from_costs: ClassVar[bool] = False  # True: ``plan_measured`` plans a user's chain from its costs

    def plan_measured(self, chain: Any) -> list[Segment]:
        """The plan over a user's chain from its measured costs
        (``bpmem.strategies.block_costs.MeasuredChain``)."""
        return self.plan_units(chain.costs.n)
