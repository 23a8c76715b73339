"""The ledger of live bytes: allocations and frees in order, their running total, its peak.

Both sides of bpmem keep the same ledger. The analytic replay (``bpmem.analytic.plain_step``)
writes one entry per storage it predicts; ``LiveTensorProbe`` writes one per storage an aten
op really makes. So the predicted and the measured timelines are lists of the same ``Event``
record, and a test can compare them entry by entry.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from bpmem.figures import Event


@dataclass(frozen=True)
class Allocation:
    """One entry of the allocation log: a storage of ``nbytes`` made (``alloc``) or released
    (``free``) under ``key``, its category, the op that made it and the phase."""

    action: str
    key: Hashable
    nbytes: int
    category: str
    op: str
    phase: str


@dataclass
class Ledger:
    """Live storages by key and category; the running total, its peak and what made it.

    ``alloc``/``free`` record an event each (``record=False`` leaves the timeline to the
    caller, as the live probe notes one event per op rather than per storage)."""

    live: dict[Hashable, tuple[int, str]] = field(default_factory=dict)
    by_category: dict[str, int] = field(default_factory=dict)
    total: int = 0
    peak: int = 0
    peak_by_category: dict[str, int] = field(default_factory=dict)
    peak_op: str = ""
    peak_phase: str = ""
    phase: str = "outside"
    events: list[Event] = field(default_factory=list)
    # with a list here, every allocation and free in order (a memory trace: bpmem.measurement.memory_trace)
    allocations: list[Allocation] | None = None

    def alloc(self, key: Hashable, nbytes: int, category: str | None = None, record: bool = True,
              op: str = "") -> None:
        category = category or self.phase
        if key in self.live:
            raise KeyError(f"{key!r} is already live")
        self.live[key] = (nbytes, category)
        self.by_category[category] = self.by_category.get(category, 0) + nbytes
        self.total += nbytes
        if self.allocations is not None:
            self.allocations.append(Allocation("alloc", key, nbytes, category, op or str(key), self.phase))
        if record:
            self.note(str(key))

    def free(self, *keys: Hashable, record: bool = True) -> None:
        for key in keys:
            nbytes, category = self.live.pop(key)
            self.by_category[category] -= nbytes
            self.total -= nbytes
            if self.allocations is not None:
                self.allocations.append(Allocation("free", key, nbytes, category, "", self.phase))
            if record:
                self.events.append(Event(f"free {key}", self.phase, self.total))

    def resize(self, key: Hashable, nbytes: int, category: str) -> None:
        """A storage that grew or shrank in place (``resize_``, which no op reports); in the
        allocation log, the old size freed and the new one allocated."""
        before, _ = self.live.get(key, (0, category))
        if self.allocations is not None and before:
            self.allocations.append(Allocation("free", key, before, category, "", self.phase))
        self.live[key] = (nbytes, category)
        self.by_category[category] = self.by_category.get(category, 0) + nbytes - before
        self.total += nbytes - before
        if self.allocations is not None and nbytes:
            self.allocations.append(Allocation("alloc", key, nbytes, category, "resize_", self.phase))

    def note(self, op: str, record: bool = True) -> None:
        """Record the total after ``op`` (with ``record``), and the peak if this is a new one."""
        if record:
            self.events.append(Event(op, self.phase, self.total))
        if self.total > self.peak:
            self.peak = self.total
            self.peak_by_category = {k: v for k, v in self.by_category.items() if v}
            self.peak_op, self.peak_phase = op, self.phase

    def nonzero_categories(self) -> dict[str, int]:
        return {k: v for k, v in self.by_category.items() if v}
