"""The numbers behind the report's plots, apart from the drawing, so tests can check them.

Each function takes the results frame (``bpmem.report.build.load``) or a timeline and returns
plain data: which cell a plot shows and why, the stacks of a bar, the x position of each
event of a timeline. ``bpmem.report.plots`` draws them. Nothing here imports matplotlib.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from bpmem.strategies import registry

# the phases of a training step in order, and the width each takes on the timeline's axis
PHASE_WIDTHS: dict[str, float] = {"zero_grad": 0.25, "forward": 1.0, "backward": 1.0, "optimizer_step": 0.5}
# what each category of live bytes is, for a legend; a phase name is what that phase made
CATEGORY_NAMES: dict[str, str] = {
    "params": "parameters", "grads": "gradients (from the last step)", "optimizer": "optimizer state",
    "inputs": "the batch (X, y)", "zero_grad": "made by zero_grad", "forward": "made in forward (activations)",
    "backward": "made in backward (gradients, temporaries)", "optimizer_step": "made by the optimizer step",
}
CATEGORY_ORDER: tuple[str, ...] = tuple(CATEGORY_NAMES)


@dataclass(frozen=True)
class Cell:
    """One cell of a plot, named: its model, batch, device, and why it was chosen."""

    model: str
    batch_size: int
    device: str
    why: str = ""

    def title(self) -> str:
        return f"{self.model}, B={self.batch_size}, {self.device}" + (f"; {self.why}" if self.why else "")


def pick_cell_where_strategies_differ(rows: Any, value: str = "saved_activation_bytes") -> Cell | None:
    """The (model, batch, device) cell whose strategies differ most in ``value``: the largest
    ratio of the most to the least among its ok training rows (per rank, the largest), ties
    to the larger batch. None if no cell has two strategies."""
    best: tuple[float, int, Cell] | None = None
    ok = rows[(rows["mode"] == "train") & (rows.status == "ok") & rows[value].notna()]
    for (model, batch, device), group in ok.groupby(["model", "batch_size", "device"], sort=True):
        per_strategy = group.groupby("label")[value].max().astype(float)
        if len(per_strategy) < 2 or per_strategy.min() <= 0:
            continue
        spread = per_strategy.max() / per_strategy.min()
        cell = Cell(str(model), int(batch), str(device),
                    f"where its {len(per_strategy)} strategies differ most ({spread:.2f}x)")
        if best is None or (spread, int(batch)) > best[:2]:
            best = (spread, int(batch), cell)
    return best[2] if best else None


@dataclass
class Breakdown:
    """Stacked bars: for each batch, the training step's bytes at its peak by category (they
    sum to the row's ``peak_bytes``) beside the inference forward's at its peak."""

    cell: Cell
    batches: list[int] = field(default_factory=list)
    train: dict[str, list[int]] = field(default_factory=dict)  # category -> bytes per batch
    inference: dict[str, list[int]] = field(default_factory=dict)
    train_peaks: list[int] = field(default_factory=list)
    inference_peaks: list[int] = field(default_factory=list)


def breakdown(frame: Any) -> Breakdown | None:
    """The plain step of the first model (by name) on its first device: the categories at the
    training peak and at the inference peak, per batch (``peak_by_category`` of the rows)."""
    has_categories = frame.peak_by_category.astype("string").fillna("") != ""  # files before the column: none
    plain = frame[(frame.strategy == registry.PLAIN) & (frame.status == "ok") & (frame.world_size == 1)
                  & frame["mode"].isin(["train", "inference"]) & has_categories]
    if plain.empty:
        return None
    model = sorted(plain.model.unique())[0]
    plain = plain[plain.model == model]
    device = sorted(plain.device.unique())[0]
    plain = plain[plain.device == device]
    batches = sorted(int(b) for b in plain.batch_size.unique())
    out = Breakdown(Cell(model, batches[-1], device, "the plain step"), batches)
    for mode, stacks, peaks in (("train", out.train, out.train_peaks), ("inference", out.inference,
                                                                         out.inference_peaks)):
        rows = plain[plain["mode"] == mode].drop_duplicates("batch_size").set_index("batch_size")
        parts = [json.loads(rows.peak_by_category[b]) if b in rows.index else {} for b in batches]
        categories = sorted({c for p in parts for c in p}, key=_category_rank)
        for category in categories:
            stacks[category] = [int(p.get(category, 0)) for p in parts]
        peaks.extend(int(rows.peak_bytes[b]) if b in rows.index else 0 for b in batches)
    return out


def _category_rank(category: str) -> tuple[int, str]:
    return (CATEGORY_ORDER.index(category) if category in CATEGORY_ORDER else len(CATEGORY_ORDER), category)


@dataclass(frozen=True)
class TimelineLayout:
    """Where each event of one step's timeline sits on a normalized axis: zero_grad, forward,
    backward and the optimizer step each take their width from ``PHASE_WIDTHS`` whatever their
    number of events, so two strategies' forward ends at the same x, and their backward too.
    With gradient accumulation (k micro-batches) each micro-batch's forward and backward take
    1/k of those widths, in the order they ran."""

    x: list[float]
    spans: list[tuple[str, float, float]]  # (phase, start, end) in step order, one per run of a phase


def timeline_layout(phases: list[str]) -> TimelineLayout:
    """x of each event from the phase of each event (in order). Events outside any phase
    (the step's start, frees between phases) join the run before them. Within a run of n
    events the k-th sits at start + width * k / n, so a run's last event is on its right edge."""
    runs: list[list[Any]] = []  # [phase, number of events]
    for phase in phases:
        if phase == "outside" and runs:
            runs[-1][1] += 1
        elif runs and (runs[-1][0] == phase or runs[-1][0] == "outside"):
            runs[-1][0], runs[-1][1] = phase, runs[-1][1] + 1
        else:
            runs.append([phase, 1])
    repeats = {phase: sum(1 for run in runs if run[0] == phase) for phase in PHASE_WIDTHS}
    spans: list[tuple[str, float, float]] = []
    x: list[float] = []
    start = 0.0
    for phase, count in runs:
        width = PHASE_WIDTHS.get(phase, 0.25) / max(1, repeats.get(phase, 1))
        x.extend(start + width * (k + 1) / count for k in range(count))
        spans.append((phase, start, start + width))
        start += width
    return TimelineLayout(x, spans)


def power_of_two_ticks(low: float, high: float, target: int = 6) -> list[float]:
    """Tick positions on a linear byte axis: multiples of the power of two that gives about
    ``target`` ticks between ``low`` and ``high`` (so 4 MiB, 8 MiB, 12 MiB; never 4.8 MiB)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return []
    step = 2.0 ** math.ceil(math.log2(max((high - low) / target, 1.0)))
    first = math.ceil(low / step) * step
    return [first + k * step for k in range(int((high - first) // step) + 1)]
