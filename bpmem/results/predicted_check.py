"""``bpmem check --predicted``: each row's measured figures against its own predictions.

Every ``ok`` row of a results.csv holds a measured column (``saved_activation_bytes``) and
the prediction beside it (``predicted_saved_activation_bytes``). A rule from
``bpmem.results.check.parse_rule`` (``saved:0%``, ``peak:1MiB``) bounds how far they may differ, in
either direction: ``saved:0%`` means equal to the byte. The CUDA allocator's peaks
have predictions of their own: ``cuda_allocated`` against ``predicted_cuda_allocated_bytes``
(the dry run's storages as 512 B blocks) and ``cuda_reserved`` against
``predicted_cuda_reserved_bytes`` (the dry run's allocations through the caching allocator
model); a file from before that column compares ``cuda_reserved`` with
``predicted_peak_bytes``, for the ratio.

Rows whose status is not ``ok`` are listed, not compared (with ``strict``, an ``error`` row
fails). As with ``bpmem check``, a gate that passes by mistake is worse than none: a missing
file or column, or a file where no rule compared anything, is bad input (``CheckInputError``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bpmem.results.check import ALIASES, BytesRule, CheckInputError, PercentRule, Rule
from bpmem.results.table import REQUIRED_COLUMNS, ResultsFileError, load_rows
from bpmem.units import format_bytes

DEFAULT_RULES: tuple[str, ...] = ("saved:0%",)
# shown beside the rules' lines, never judged, where the file has them and no rule covers them
SHOWN_COLUMNS: tuple[str, ...] = ("peak_bytes", "cuda_max_allocated_bytes", "cuda_step_allocated_bytes")
# measured columns whose prediction is another column than predicted_<column>: the allocator's
# whole peak and the step's own share of it (less the workspace) beside the 512 B-block peak
PREDICTED_OF: dict[str, str] = {"cuda_max_allocated_bytes": "predicted_cuda_allocated_bytes",
                                "cuda_step_allocated_bytes": "predicted_cuda_allocated_bytes",
                                "cuda_max_reserved_bytes": "predicted_cuda_reserved_bytes"}
SHORT_NAMES: dict[str, str] = {column: name for name, column in ALIASES.items()}


def predicted_column(column: str, present: set[str] | None = None) -> str:
    """The column that holds the prediction of the measured ``column`` (in a file whose header
    is ``present``: one without the reserved prediction compares reserved with the peak)."""
    if column == "cuda_max_reserved_bytes" and present is not None and "predicted_cuda_reserved_bytes" not in present:
        return "predicted_peak_bytes"
    return PREDICTED_OF.get(column, f"predicted_{column}")


@dataclass(frozen=True)
class Line:
    """One figure of one row: measured against predicted, and what the rule (if any) says."""

    cell: str
    rank: int
    column: str
    predicted: int
    measured: int
    rule: Rule | None

    @property
    def delta(self) -> int:
        return self.measured - self.predicted

    @property
    def ratio(self) -> float | None:
        return self.measured / self.predicted if self.predicted else None

    @property
    def verdict(self) -> str:
        """``ok`` or ``FAIL`` under the rule; ``-`` for a line shown but not judged."""
        if self.rule is None:
            return "-"
        slack = self.rule.allowed(self.predicted) - self.predicted
        return "ok" if abs(self.delta) <= slack else "FAIL"


@dataclass
class PredictedComparison:
    """Every line compared, the rows not compared (``cell (rank r): status: error``), and how
    many rule checks had no value on one side (a prediction that is not made, e.g. FSDP's peak)."""

    lines: list[Line] = field(default_factory=list)
    not_ok: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    missing_values: dict[str, int] = field(default_factory=dict)
    strict: bool = False

    @property
    def failures(self) -> list[Line]:
        return [line for line in self.lines if line.verdict == "FAIL"]

    @property
    def failed(self) -> bool:
        return bool(self.failures) or (self.strict and bool(self.errors))


def _load(places: list[Path], columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of each results.csv (or run folder), checked by ``load_rows``."""
    from bpmem.results.merge import results_path

    rows: list[dict[str, str]] = []
    for place in places:
        try:
            rows.extend(load_rows(results_path(place), REQUIRED_COLUMNS + columns))
        except ResultsFileError as error:
            raise CheckInputError(str(error)) from None
    return rows


def _header(places: list[Path]) -> set[str]:
    """Every column any of the files names (unreadable ones are left to ``_load`` to report)."""
    import csv

    from bpmem.results.merge import results_path

    names: set[str] = set()
    for place in places:
        try:
            with open(results_path(place), newline="") as handle:
                names.update(next(csv.reader(handle), []))
        except OSError:
            continue
    return names


def compare_predicted(places: Path | list[Path], rules: list[Rule], strict: bool = False) -> PredictedComparison:
    """Apply every rule to every ok row of ``places`` (results.csv files or run folders).
    Raises CheckInputError for a missing file or column, or when no rule compared a value."""
    places = places if isinstance(places, list) else [places]
    for rule in rules:
        if rule.column.startswith("predicted_"):
            raise CheckInputError(f"rule on {rule.column}: a prediction is what a rule compares with; allowed: "
                                  f"a measured column ({', '.join(ALIASES)} or a *_bytes column)")
    header = _header(places)
    needed = tuple(dict.fromkeys(c for rule in rules for c in (rule.column, predicted_column(rule.column, header))))
    rows = _load(places, needed)
    judged, present = {rule.column for rule in rules}, {column for row in rows for column in row}
    shown = [c for c in SHOWN_COLUMNS if c not in judged and {c, predicted_column(c, present)} <= present]
    checks: list[tuple[str, Rule | None]] = [(rule.column, rule) for rule in rules] + [(c, None) for c in shown]
    outcome = PredictedComparison(strict=strict)
    for row in rows:
        cell, rank = row["cell_id"], int(row.get("rank") or 0)
        if row["status"] != "ok":
            error = row.get("error", "")
            text = f"{cell} (rank {rank}): {row['status']}" + (f": {error}" if error else "")
            outcome.not_ok.append(text)
            if row["status"] == "error":
                outcome.errors.append(text)
            continue
        for column, rule in checks:
            measured, predicted = row.get(column, ""), row.get(predicted_column(column, present), "")
            if measured == "" or predicted == "":
                if rule is not None:
                    outcome.missing_values[column] = outcome.missing_values.get(column, 0) + 1
                continue
            outcome.lines.append(Line(cell, rank, column, int(predicted), int(measured), rule))
    if not any(line.rule is not None for line in outcome.lines):
        ok = sum(row["status"] == "ok" for row in rows)
        pairs = "; ".join(f"{rule.column} and {predicted_column(rule.column, present)}" for rule in rules)
        raise CheckInputError(f"nothing compared: {', '.join(str(p) for p in places)} has {len(rows)} row(s), {ok} "
                              f"ok, and no ok row has both figures of a rule ({pairs}); allowed: a results.csv of "
                              "`bpmem run` with ok rows, and rules on figures that were measured and predicted")
    return outcome


def rule_text(rule: Rule | None) -> str:
    """``saved ±0%``, ``peak ±1.0 MiB``; ``-`` for no rule."""
    if rule is None:
        return "-"
    name = SHORT_NAMES.get(rule.column, rule.column)
    if isinstance(rule, PercentRule):
        return f"{name} ±{rule.percent:g}%"
    assert isinstance(rule, BytesRule)
    return f"{name} ±{format_bytes(rule.nbytes)}"


def _signed(nbytes: int) -> str:
    return ("+" if nbytes > 0 else "") + format_bytes(nbytes)


def render_predicted(comparison: PredictedComparison) -> str:
    """The table (IEC units; ratio = measured / predicted), the rows not compared, a verdict line."""
    out = []
    if comparison.lines:
        width = max(len(line.cell) for line in comparison.lines)
        out.append(f"{'cell':<{width}}  rank  {'field':<16} {'predicted':>11} {'measured':>11} {'delta':>11} "
                   f"{'ratio':>7}  {'rule':<20} verdict")
        for line in comparison.lines:
            ratio = "-" if line.ratio is None else f"{line.ratio:.3f}"
            out.append(f"{line.cell:<{width}}  {line.rank:>4}  {SHORT_NAMES.get(line.column, line.column):<16} "
                       f"{format_bytes(line.predicted):>11} {format_bytes(line.measured):>11} "
                       f"{_signed(line.delta):>11} {ratio:>7}  {rule_text(line.rule):<20} {line.verdict}")
    for text in comparison.not_ok:
        kind = "FAIL" if comparison.strict and text in comparison.errors else "not compared"
        out.append(f"{kind}: {text}")
    judged = [line for line in comparison.lines if line.rule is not None]
    rows = len({(line.cell, line.rank) for line in judged})
    missing = "".join(f"; {n} ok row(s) without a measured or predicted {SHORT_NAMES.get(c, c)} (not compared)"
                      for c, n in comparison.missing_values.items())
    errors = f", {len(comparison.errors)} error row(s)" if comparison.errors else ""
    out.append(f"bpmem check --predicted: {rows} row(s) compared, {len(comparison.failures)} failure(s), "
               f"{len(comparison.not_ok)} row(s) not ok{errors}{missing}")
    return "\n".join(out)
