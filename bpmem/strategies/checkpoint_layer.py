"""``checkpoint-layer``: every unit (Linear + activation) checkpointed on its own.

Each unit keeps only its input, which is exactly what a ReLU, tanh or sigmoid network keeps
anyway (the activation's output is the next Linear's input): on such a network it saves
nothing and recomputes every unit. On GELU, which also keeps its input z, it halves the
hidden activations."""

from __future__ import annotations

from bpmem.analytic.planner import Segment, layer_plan
from bpmem.strategies.base import strategy
from bpmem.strategies.segment_plan import SegmentPlanConfig


@strategy("checkpoint-layer", "every unit (Linear + activation) checkpointed on its own", in_timeline_plot=True)
class CheckpointLayer(SegmentPlanConfig):
    def plan_units(self, units: int) -> list[Segment]:
        return layer_plan(units)
