"""``checkpoint-selective``: the whole model in one selective checkpoint (``torch.utils.
checkpoint.create_selective_checkpoint_contexts``), which keeps the outputs its policy marks
MUST_SAVE in its own storage and recomputes the rest in backward:

- ``save-matmuls``: every mm/addmm output, z_0 .. z_{depth-1} (B*h*s each) and the logits o
  (B*q*s; under MSE the loss saves that very storage, so it counts once); only the cheap
  elementwise activations are recomputed;
- ``save-activations``: every activation output h_j (B*h*s each); every matmul but the
  output one is recomputed (early stopping ends the replay at its saved input).

Either way the checkpoint also keeps its input X, and the loss keeps its own tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bpmem.analytic.rules import chain_costs, loss_saved_bytes
from bpmem.figures import Term
from bpmem.strategies.base import StrategyConfig, parameter, strategy

if TYPE_CHECKING:
    from bpmem.figures import Estimate
    from bpmem.spec import MLPSpec, StepSpec

POLICIES: tuple[str, ...] = ("save-matmuls", "save-activations")


@strategy("checkpoint-selective", "one selective checkpoint: keep matmul or activation outputs (--policy)",
          in_timeline_plot=True)
class CheckpointSelective(StrategyConfig):
    def why(self, spec: MLPSpec, plain_terms: dict[str, int], kept: int, plain: int) -> str:
        return ("its policy keeps the outputs it marks must-save in storage of its own and recomputes the rest, "
                "so it keeps at least what the plain step keeps for those ops")

    policy: str = parameter("save-matmuls", "POLICY", "keep matmul outputs or activation outputs", POLICIES)

    def predict(self, spec: MLPSpec, step: StepSpec, plain: Estimate) -> Estimate:
        b, s, h, q = step.batch_size, spec.itemsize, spec.hidden_dim, spec.output_dim
        costs = chain_costs(spec, b)
        if self.policy == "save-matmuls":
            kept = spec.depth * b * h * s + (b * q * s if spec.loss == "cross_entropy" else 0)
            flops, formula = 0, "X + depth*B*h*s (z) + B*q*s (o, unless MSE saves it already) + loss"
            working = spec.depth * b * h * s  # the activations rebuilt from z in backward
        else:
            kept = spec.depth * b * h * s
            flops, formula = sum(costs.forward_flops[:-1]), "X + depth*B*h*s (activation outputs) + loss"
            working = max(costs.boundary_bytes[1:] + (b * q * s,))  # one recomputed matmul output at a time
        retained = costs.boundary_bytes[0] + kept + loss_saved_bytes(spec, b)
        terms = [Term("retained (selective checkpoint)", retained, formula,
                      "create_selective_checkpoint_contexts keeps MUST_SAVE outputs in its own storage")]
        peak = plain.peak_bytes - plain.saved_activation_bytes + retained + working
        return plain.under_strategy(retained, peak, flops, {"policy": self.policy}, terms)

    def runtime(self, spec: MLPSpec, step: StepSpec) -> Any:
        from bpmem.strategies.checkpointing import SelectiveStrategy

        return SelectiveStrategy(self.policy)
