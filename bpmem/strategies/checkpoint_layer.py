"""``checkpoint-layer``: every unit (Linear + activation) checkpointed on its own.

Each unit keeps only its input, which is exactly what a ReLU, tanh or sigmoid network keeps
anyway (the activation's output is the next Linear's input): on such a network it saves
nothing and recomputes every unit. On GELU, which also keeps its input z, it halves the
hidden activations."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bpmem.analytic.planner import Segment, layer_plan
from bpmem.strategies.base import strategy
from bpmem.strategies.segment_plan import SegmentPlanConfig

if TYPE_CHECKING:
    from bpmem.spec import MLPSpec


@strategy("checkpoint-layer", "every unit (Linear + activation) checkpointed on its own", in_timeline_plot=True)
class CheckpointLayer(SegmentPlanConfig):
    def why(self, spec: MLPSpec, plain_terms: dict[str, int], kept: int, plain: int) -> str:
        if kept == plain and spec.activation in ("relu", "tanh", "sigmoid"):
            return (f"it keeps each layer's input, and {spec.activation} already keeps its output, which is the "
                    "next layer's input: the boundaries it keeps are the tensors the plain step keeps anyway")
        return "it keeps each layer's input and recomputes the layer's insides in backward"

    def plan_units(self, units: int) -> list[Segment]:
        return layer_plan(units)
