"""``checkpoint-every-k``: a checkpoint over every run of ``k`` units, the last run included.

The worked example of the registry: this module and one line in ``registry`` are all it
took. Between ``checkpoint-layer`` (k = 1) and one checkpoint over the whole chain (k >= n),
it fixes the segment length rather than the count, so deeper models keep the same
recompute per segment: retained bytes are the inputs of the ceil(n / k) segments.
"""

from __future__ import annotations

from bpmem.analytic.planner import Segment
from bpmem.strategies.base import parameter, strategy
from bpmem.strategies.segment_plan import SegmentPlanConfig


@strategy("checkpoint-every-k", "a checkpoint over every k units, the last run too (--k K)")
class CheckpointEveryK(SegmentPlanConfig):
    k: int = parameter(2, "K", "units per checkpointed segment")

    def plan_units(self, units: int) -> list[Segment]:
        n = units
        return [Segment(start, min(start + self.k, n), True) for start in range(0, n, self.k)]
