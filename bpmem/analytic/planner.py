"""Where to cut the chain: segment plans, their retained bytes and recomputed FLOPs, and
the budget planner (dynamic programming over the chain).

The chain has n units: unit j is (Linear_j, activation_j) for j < depth, and the last unit
is the output Linear alone. Boundary j is unit j's input: X for j = 0, else h_{j-1}.

A *plan* cuts the chain into contiguous segments, each run plainly or under non-reentrant
checkpointing. What the graph then retains (besides the loss internals):

- a segment's first boundary, always (a plain unit's Linear saves it as ``mat1``; a
  checkpointed segment saves its input to replay from);
- for a plain unit, its own boundary and its internals (GELU's input z);
- nothing else from inside a checkpointed segment: autograd's saved tensors there are
  dropped and rebuilt in backward by running the segment's forward again.

So a plain segment costs the sum of its units' boundaries and internals in bytes and no
FLOPs; a checkpointed segment [j, i) costs boundary j in bytes and the forward FLOPs of
units j..i-1 in recomputation (less the output Linear's, which early stopping skips).
Costs add over segments, which is what makes the DP exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product


@dataclass(frozen=True)
class Segment:
    """Units ``start`` .. ``end - 1``, checkpointed or run plainly."""

    start: int
    end: int
    checkpointed: bool


@dataclass(frozen=True)
class ChainCosts:
    """Per-unit byte and FLOP costs of one model at one batch size."""

    boundary_bytes: tuple[int, ...]  # unit j's input
    internal_bytes: tuple[int, ...]  # what a plain unit saves besides its input (GELU's z)
    forward_flops: tuple[int, ...]  # matmul FLOPs of unit j's forward (2*B*in*out)

    @property
    def n(self) -> int:
        return len(self.boundary_bytes)

    def segment_cost(self, start: int, end: int, checkpointed: bool) -> tuple[int, int]:
        """(retained bytes, recomputed FLOPs) of one segment.

        Recomputation stops early (``early_stop=True``) once the last tensor the segment
        saved has been rebuilt. The output Linear saves only its input, which autograd packs
        before the matmul runs, so a segment that ends the chain never redoes that matmul.
        """
        if checkpointed:
            flops = sum(self.forward_flops[start:end])
            if end == self.n:
                flops -= self.forward_flops[-1]
            return self.boundary_bytes[start], flops
        return sum(self.boundary_bytes[start:end]) + sum(self.internal_bytes[start:end]), 0

    def plan_cost(self, plan: list[Segment]) -> tuple[int, int]:
        costs = [self.segment_cost(s.start, s.end, s.checkpointed) for s in plan]
        return sum(c[0] for c in costs), sum(c[1] for c in costs)


def plain_plan(n: int) -> list[Segment]:
    return [Segment(0, n, False)]


def layer_plan(n: int) -> list[Segment]:
    """Every unit its own checkpointed segment."""
    return [Segment(j, j + 1, True) for j in range(n)]


def uniform_plan(n: int, segments: int) -> list[Segment]:
    """``segments`` checkpointed pieces of near-equal length (they differ by at most one unit).

    Unlike ``checkpoint_sequential``, which runs its last piece plainly, every piece is
    checkpointed, as in Chen et al.: k segments then retain k boundaries, and the
    recomputation is one extra forward whatever k is.
    """
    segments = max(1, min(segments, n))
    size, longer = divmod(n, segments)
    plan, start = [], 0
    for index in range(segments):
        end = start + size + (1 if index < longer else 0)
        plan.append(Segment(start, end, True))
        start = end
    return plan


def sqrt_segments(n: int) -> int:
    """Chen et al. (2016): about sqrt(n) segments keep O(sqrt(n)) memory for one extra forward."""
    return max(1, math.ceil(math.sqrt(n)))


def smallest_retained(costs: ChainCosts) -> int:
    """The fewest bytes any plan retains: least[i] = min over j < i of least[j] plus the
    cheaper of segment [j, i) plain or checkpointed. (A frozen block may retain less plain.)"""
    least = [0] + [0] * costs.n
    for i in range(1, costs.n + 1):
        least[i] = min(least[j] + min(costs.segment_cost(j, i, c)[0] for c in (False, True)) for j in range(i))
    return least[costs.n]


def plan_for_budget(costs: ChainCosts, budget_bytes: int) -> list[Segment] | None:
    """The plan with the fewest recomputed FLOPs whose retained bytes fit ``budget_bytes``.

    Recurrence. Let F(i) be the Pareto set of (bytes, flops) over all plans of units
    0..i-1 (no point in it has both more bytes and more FLOPs than another). Then

        F(0) = {(0, 0)}
        F(i) = Pareto( { (b + bytes(j, i, c), f + flops(j, i, c))
                         : 0 <= j < i, c in {plain, checkpointed}, (b, f) in F(j) } )

    where bytes/flops are ``ChainCosts.segment_cost``. The answer is the point of F(n) with
    bytes <= budget and the fewest FLOPs (then the fewest bytes). Every plan's cost is a sum
    over its segments, so the best plan of units 0..i-1 that ends with segment [j, i) extends
    a Pareto point of F(j): the recurrence loses nothing. Returns None when even one
    checkpointed segment over the whole chain exceeds the budget.
    """
    n = costs.n
    frontier: list[dict[tuple[int, int], tuple[int, bool, tuple[int, int]] | None]] = [{(0, 0): None}]
    for i in range(1, n + 1):
        candidates: dict[tuple[int, int], tuple[int, bool, tuple[int, int]]] = {}
        for j in range(i):
            # a plain run of several units costs the same as single plain units: only length 1
            for checkpointed in ((False, True) if i - j == 1 else (True,)):
                seg_bytes, seg_flops = costs.segment_cost(j, i, checkpointed)
                for point in frontier[j]:
                    total = (point[0] + seg_bytes, point[1] + seg_flops)
                    if total[0] <= budget_bytes and total not in candidates:
                        candidates[total] = (j, checkpointed, point)
        frontier.append(_pareto(candidates))
    if not frontier[n]:
        return None
    best = min(frontier[n], key=lambda point: (point[1], point[0]))
    plan, i, point = [], n, best
    while i > 0:
        j, checkpointed, previous = frontier[i][point]  # type: ignore[misc]
        plan.append(Segment(j, i, checkpointed))
        i, point = j, previous
    return _merge_plain(plan[::-1])


def _pareto(points: dict[tuple[int, int], object]) -> dict[tuple[int, int], object]:
    kept: dict[tuple[int, int], object] = {}
    best_flops = None
    for point in sorted(points):  # by bytes, then flops
        if best_flops is None or point[1] < best_flops:
            kept[point] = points[point]
            best_flops = point[1]
    return kept


def _merge_plain(plan: list[Segment]) -> list[Segment]:
    """Join neighbouring plain segments (same cost, fewer pieces)."""
    merged: list[Segment] = []
    for segment in plan:
        if merged and not segment.checkpointed and not merged[-1].checkpointed:
            merged[-1] = Segment(merged[-1].start, segment.end, False)
        else:
            merged.append(segment)
    return merged


def brute_force_plan(costs: ChainCosts, budget_bytes: int) -> tuple[int, int] | None:
    """(flops, bytes) of the best plan by trying every cut and mode: the DP's referee."""
    n, best = costs.n, None
    for cuts in product((False, True), repeat=n - 1):
        starts = [0] + [k + 1 for k, cut in enumerate(cuts) if cut]
        bounds = list(zip(starts, starts[1:] + [n], strict=True))
        for modes in product((False, True), repeat=len(bounds)):
            plan = [Segment(s, e, c) for (s, e), c in zip(bounds, modes, strict=True)]
            total_bytes, total_flops = costs.plan_cost(plan)
            if total_bytes <= budget_bytes and (best is None or (total_flops, total_bytes) < best):
                best = (total_flops, total_bytes)
    return best


def describe(plan: list[Segment]) -> str:
    """``c0-3,p4-5``: c for checkpointed, p for plain, unit ranges inclusive."""
    return ",".join(f"{'c' if s.checkpointed else 'p'}{s.start}-{s.end - 1}" for s in plan)
