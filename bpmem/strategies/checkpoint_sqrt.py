"""``checkpoint-sqrt``: uniform segments, ceil(sqrt(n)) of them for n units, which keeps
O(sqrt(n)) boundaries for one extra forward (Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost")."""

from __future__ import annotations

from bpmem.analytic.planner import Segment, sqrt_segments, uniform_plan
from bpmem.strategies.base import strategy
from bpmem.strategies.segment_plan import SegmentPlanConfig


@strategy("checkpoint-sqrt", "ceil(sqrt(n)) uniform segments for n units (Chen et al. 2016)", in_timeline_plot=True)
class CheckpointSqrt(SegmentPlanConfig):
    def plan_units(self, units: int) -> list[Segment]:
        n = units
        return uniform_plan(n, sqrt_segments(n))
