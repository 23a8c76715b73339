"""``checkpoint-sqrt``: uniform segments, ceil(sqrt(n)) of them for n units, which keeps
O(sqrt(n)) boundaries for one extra forward (Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bpmem.analytic.planner import Segment, sqrt_segments, uniform_plan
from bpmem.strategies.base import strategy
from bpmem.strategies.segment_plan import SegmentPlanConfig

if TYPE_CHECKING:
    from bpmem.spec import MLPSpec


@strategy("checkpoint-sqrt", "ceil(sqrt(n)) uniform segments for n units (Chen et al. 2016)", in_timeline_plot=True)
class CheckpointSqrt(SegmentPlanConfig):
    def plan(self, spec: MLPSpec, batch_size: int) -> list[Segment]:
        n = spec.depth + 1
        return uniform_plan(n, sqrt_segments(n))
