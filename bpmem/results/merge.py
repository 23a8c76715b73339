"""Shards of one sweep, put back together: ``bpmem run --shard K/N`` and the merge that
``bpmem report`` and ``bpmem check`` do when given several run folders.

A shard is a deterministic slice of the grid: series (the cells that differ only in batch
size, which an out-of-memory error cuts short together) are dealt round-robin, in the
grid's own order, to shards 1..N. So every cell is in exactly one shard, whichever machine
runs it, and a series is never split across shards.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from bpmem.results.table import REQUIRED_COLUMNS, TIMELINE_COLUMNS, ResultsFileError, load_rows


class InSeries(Protocol):
    """What a shard needs of a sweep's cell (``bpmem.sweep.config.Cell``): the series it is in."""

    @property
    def series(self) -> Hashable: ...


CellT = TypeVar("CellT", bound=InSeries)


@dataclass(frozen=True)
class Shard:
    """The K-th of N slices (1 <= K <= N)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"2/4"`` -> Shard(2, 4); ValueError with the allowed form otherwise."""
        first, slash, second = text.partition("/")
        if not (slash and first.strip().isdigit() and second.strip().isdigit()):
            raise ValueError(f"{text!r} is not a shard; allowed: K/N with 1 <= K <= N, e.g. 1/4")
        shard = cls(int(first), int(second))
        if not 1 <= shard.index <= shard.count:
            raise ValueError(f"{text!r} is not a shard; allowed: K/N with 1 <= K <= N, e.g. 1/4")
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def cells(self, cells: list[CellT]) -> list[CellT]:
        """This shard's cells: whole series, every N-th in order of first appearance."""
        order: dict[object, int] = {}
        for cell in cells:
            order.setdefault(cell.series, len(order))
        return [cell for cell in cells if order[cell.series] % self.count == self.index - 1]


def results_path(place: Path) -> Path:
    """A results.csv, given itself or the run folder that holds it."""
    return place / "results.csv" if place.is_dir() else place


def merged_rows(places: list[Path], required: tuple[str, ...] = REQUIRED_COLUMNS
                ) -> tuple[list[str], list[dict[str, str]]]:
    """The header and every row of several results.csv files (or run folders). The headers
    must agree, and a (cell_id, rank) found in two files is an error, not a duplicate."""
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    seen: dict[tuple[str, str], Path] = {}
    for place in places:
        path = results_path(place)
        found = load_rows(path, required)
        with path.open(newline="", encoding="utf-8") as handle:
            this_header = next(csv.reader(handle))
        if header is not None and this_header != header:
            raise ResultsFileError(f"{path}: has other columns than {results_path(places[0])}; allowed: shards "
                                   "of one sweep config")
        header = this_header
        for row in found:
            key = (row["cell_id"], row.get("rank") or "0")
            if key in seen:
                raise ResultsFileError(f"cell {key[0]!r} rank {key[1]} is in both {seen[key]} and {path}; allowed: "
                                       "each cell in one folder (shards of one sweep never overlap)")
            seen[key] = path
            rows.append(row)
    return header or [], rows


def merge_runs(folders: list[Path], out: Path) -> Path:
    """Write ``out/results.csv`` (and ``timelines.csv``) from several run folders, so that
    ``out`` is one run folder like any other; returns its results.csv."""
    header, rows = merged_rows(folders)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (out / "results.csv").write_text(buffer.getvalue())
    events = [folder / "timelines.csv" for folder in folders if (folder / "timelines.csv").exists()]
    if events:
        lines = [list(TIMELINE_COLUMNS)]
        for path in events:
            with path.open(newline="") as handle:
                lines.extend(list(csv.reader(handle))[1:])
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(lines)
        (out / "timelines.csv").write_text(buffer.getvalue())
    (out / "run.json").write_text(json.dumps({"merged_from": [str(f) for f in folders]}, indent=2) + "\n")
    return out / "results.csv"
