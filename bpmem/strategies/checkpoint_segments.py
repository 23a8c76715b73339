"""``checkpoint-segments``: the chain cut into ``segments`` uniform segments, every one but
the last checkpointed, as ``torch.utils.checkpoint.checkpoint_sequential`` cuts it."""

from __future__ import annotations

from bpmem.analytic.planner import Segment, uniform_plan
from bpmem.strategies.base import parameter, strategy
from bpmem.strategies.segment_plan import SegmentPlanConfig


@strategy("checkpoint-segments", "K uniform segments, all but the last checkpointed (--segments K)")
class CheckpointSegments(SegmentPlanConfig):
    segments: int = parameter(4, "K", "uniform segments, all but the last checkpointed")

    def plan_units(self, units: int) -> list[Segment]:
        return uniform_plan(units, self.segments)
