"""``checkpoint-budget``: the segment plan that retains at most ``budget`` bytes with the
fewest recomputed FLOPs, found by dynamic programming over the chain (``planner``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from bpmem.analytic.planner import Segment, plan_for_budget, smallest_retained
from bpmem.analytic.rules import chain_costs, loss_saved_bytes, plain_retained_bytes
from bpmem.strategies.base import BUDGET_HELP, Budget, parameter, strategy
from bpmem.strategies.segment_plan import SegmentPlanConfig
from bpmem.validation import InfeasibleBudget

if TYPE_CHECKING:
    from bpmem.spec import MLPSpec
    from bpmem.strategies.block_costs import MeasuredChain


@strategy("checkpoint-budget", "the fewest recomputed FLOPs within a byte budget (--budget FRACTION|BYTES)")
class CheckpointBudget(SegmentPlanConfig):
    budget: Budget = parameter(Budget(fraction=0.5), "BYTES|FRACTION", BUDGET_HELP)

    def plan(self, spec: MLPSpec, batch_size: int) -> list[Segment]:
        costs = chain_costs(spec, batch_size)
        loss = loss_saved_bytes(spec, batch_size)
        plain = plain_retained_bytes(spec, batch_size)
        limit = self.budget.of(plain)
        plan = plan_for_budget(costs, limit - loss)
        if plan is None:
            raise InfeasibleBudget(limit, costs.boundary_bytes[0] + loss, plain)
        return plan

    plans_from_costs: ClassVar[bool] = True

    def plan_measured(self, chain: MeasuredChain) -> list[Segment]:
        """A user's chain: the budget is a share of what its plain forward saves (the loss, not
        yet run when the plan is made, is left out), met by the blocks and what lies outside."""
        limit = self.budget.of(chain.plain_bytes)
        plan = plan_for_budget(chain.costs, limit - chain.outside_bytes)
        if plan is None:
            raise InfeasibleBudget(limit, smallest_retained(chain.costs) + chain.outside_bytes, chain.plain_bytes)
        return plan

    def extra_params(self, spec: MLPSpec, batch_size: int) -> dict[str, Any]:
        return {"budget": self.budget.value, "budget_bytes": self.budget.of(plain_retained_bytes(spec, batch_size))}
