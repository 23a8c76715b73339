"""``compile-budget``: ``torch.compile`` whose min-cut partitioner meets
``activation_memory_budget`` (a fraction of what eager would save); see
``bpmem.strategies.compiled`` for the backend.

The partitioner's choice has no closed formula, so the prediction asks it: the model is
compiled and run once on fake CPU tensors (shapes and dtypes, no data, no memory), the
saved tensors are counted by ``SavedTensorProbe`` and the compiled graphs' matmul FLOPs by
their own counter; the plain step's FLOPs are subtracted (each Linear: 2*B*in*out forward,
the same for its weight gradient, and for its input gradient except on the first layer,
whose input needs none). This is the one single-device prediction that imports torch.

Fake *CPU* tensors, not the meta device: inductor's decompositions depend on the device. On
any device but the CPU they rewrite a matmul whose inner dimension is 1 (a weight gradient
at B=1) as a broadcast multiply, which no FLOP counter counts as a matmul, so a meta trace
at B=1 planned a graph the CPU never runs and read its FLOPs 2*in*out low per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bpmem.analytic.rules import plain_retained_bytes
from bpmem.figures import Term
from bpmem.strategies.base import BUDGET_HELP, Budget, StrategyConfig, parameter, strategy

if TYPE_CHECKING:
    from bpmem.figures import Estimate
    from bpmem.spec import MLPSpec, StepSpec


@strategy("compile-budget", "torch.compile's min-cut partitioner under an activation budget (--budget)",
          compiles=True, predicts_by_arithmetic=False)
class CompileBudget(StrategyConfig):
    def why(self, spec: MLPSpec, plain_terms: dict[str, int], kept: int, plain: int) -> str:
        return "the compiler's min-cut partitioner chooses what to keep under the budget"

    budget: Budget = parameter(Budget(fraction=0.5), "BYTES|FRACTION", BUDGET_HELP)

    def fraction(self, spec: MLPSpec, batch_size: int) -> float:
        """The partitioner takes a fraction: bytes become one of the plain step's retained bytes."""
        if self.budget.fraction is not None:
            return self.budget.fraction
        return min(1.0, self.budget.of(0) / plain_retained_bytes(spec, batch_size))

    def predict(self, spec: MLPSpec, step: StepSpec, plain: Estimate) -> Estimate:
        retained, flops = self._partitioner_plan_on_fake_cpu(spec, step)
        terms = [Term("retained (min-cut partitioner's plan)", retained, "saved by the compiled graph, on fake tensors",
                      "torch.compile's own partition of the joint graph, traced on fake CPU tensors: no memory")]
        budget_bytes = self.budget.of(plain_retained_bytes(spec, step.batch_size))
        return plain.under_strategy(retained, plain.peak_bytes - plain.saved_activation_bytes + retained, flops,
                                    {"budget": self.budget.value, "budget_bytes": budget_bytes}, terms)

    def runtime(self, spec: MLPSpec, step: StepSpec) -> Any:
        from bpmem.strategies.compiled import CompiledBudgetStrategy

        return CompiledBudgetStrategy(self.fraction(spec, step.batch_size))

    def _partitioner_plan_on_fake_cpu(self, spec: MLPSpec, step: StepSpec) -> tuple[int, int]:
        import warnings

        from bpmem.measurement.step import forward_objective
        from bpmem.models.mlp import as_workload
        from bpmem.probes import SavedTensorProbe
        from bpmem.torch_private import fake_tensor_mode

        b, workload = step.batch_size, as_workload(spec)
        strategy = self.runtime(spec, step)
        with warnings.catch_warnings(), fake_tensor_mode():
            warnings.simplefilter("ignore")
            model = workload.build("cpu", seed=None)
            x, y = workload.make_batch(b, "cpu")
            probe = SavedTensorProbe(model)
            with strategy.tally.counting() as tally, probe:
                forward_objective(spec, model, x, y, probe.scope, strategy).backward()
        plain = sum(2 * b * fan_in * fan_out * (3 if index else 2)
                    for index, (fan_in, fan_out) in enumerate(spec.layer_dims()))
        return probe.saved_activation_bytes, tally.total - plain
