"""``bpmem check``: compare two results.csv files cell by cell; fail on a memory regression.

Rules are small classes parsed from ``FIELD:TOLERANCE``: ``saved:0%`` (no growth at all),
``peak:2%`` (at most 2% more), ``peak:1MiB`` (at most 1 MiB more). Fields are the byte
columns, by their short name (``saved``, ``peak``, ``params``, ``grads``, ``optimizer``,
``inference_peak``, ``cuda_allocated``, ``cuda_reserved``) or full column name. Cells are
joined on ``cell_id`` and ``rank``. Improvements are reported too; a cell present in only
one file is a warning, or a failure with ``strict``.

A gate that passes by mistake is worse than none, so:
- a cell that was ``ok`` in the baseline and is ``oom``, ``error`` or ``skipped`` now is a
  regression, always;
- a rule's column missing from either file, a malformed file, and comparing nothing at all
  are bad input (``CheckInputError``; ``bpmem check`` exits 2), never a pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpmem.figures import ALIASES as FIGURE_ALIASES
from bpmem.results.table import REQUIRED_COLUMNS, ResultsFileError
from bpmem.units import format_bytes, parse_bytes

ALIASES: dict[str, str] = FIGURE_ALIASES  # saved -> saved_activation_bytes, ... (bpmem.figures)


class RuleError(ValueError):
    """A rule that does not parse; the message shows the allowed forms."""


class CheckInputError(ValueError):
    """The files cannot be compared as asked: a rule's column is missing, a file is
    malformed (``ResultsFileError``), or no cell is in both files."""


@dataclass(frozen=True)
class PercentRule:
    """Fails when the new value exceeds the baseline by more than ``percent`` of it."""

    column: str
    percent: float

    def allowed(self, baseline: int) -> float:
        return baseline * (1 + self.percent / 100)

    def __str__(self) -> str:
        return f"{self.column} +{self.percent:g}%"


@dataclass(frozen=True)
class BytesRule:
    """Fails when the new value exceeds the baseline by more than ``nbytes``."""

    column: str
    nbytes: int

    def allowed(self, baseline: int) -> float:
        return baseline + self.nbytes

    def __str__(self) -> str:
        return f"{self.column} +{format_bytes(self.nbytes)}"


Rule = PercentRule | BytesRule


def parse_rule(text: str) -> Rule:
    """``saved:0%`` -> PercentRule; ``peak:1MiB`` -> BytesRule."""
    name, sep, tolerance = text.partition(":")
    column = ALIASES.get(name.strip(), name.strip())
    if not sep or not (column.endswith("_bytes")):
        raise RuleError(f"{text!r} is not a rule; allowed: FIELD:N% or FIELD:BYTES, FIELD one of "
                        f"{', '.join(ALIASES)} (or a *_bytes column), e.g. saved:0% peak:2% peak:1MiB")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", tolerance)
    if match:
        return PercentRule(column, float(match.group(1)))
    try:
        return BytesRule(column, parse_bytes(tolerance.strip()))
    except ValueError:
        raise RuleError(f"{text!r}: {tolerance!r} is not a tolerance; allowed: N% or a size like 512, 1MiB") from None


@dataclass
class Comparison:
    """What ``compare`` found: one line per cell and field, and the verdict."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    only_in_baseline: list[str] = field(default_factory=list)
    only_in_results: list[str] = field(default_factory=list)
    # cells ok in the baseline that did not finish now: "cell (rank r): oom: message"
    no_longer_ok: list[str] = field(default_factory=list)
    strict: bool = False

    @property
    def regressions(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["verdict"] == "REGRESSION"]

    @property
    def failed(self) -> bool:
        missing = bool(self.only_in_baseline or self.only_in_results)
        return bool(self.regressions) or bool(self.no_longer_ok) or (self.strict and missing)


def _rows(places: Path | list[Path], columns: tuple[str, ...]) -> dict[tuple[str, int], dict[str, Any]]:
    """Every row of one or several results.csv files (or run folders: shards merged) by
    (cell_id, rank), each file checked first."""
    from bpmem.results.merge import merged_rows

    try:
        _, rows = merged_rows(places if isinstance(places, list) else [places], REQUIRED_COLUMNS + columns)
    except ResultsFileError as error:
        raise CheckInputError(str(error)) from None
    return {(row["cell_id"], int(row.get("rank") or 0)): row for row in rows}


def compare(baseline: Path | list[Path], results: Path | list[Path], rules: list[Rule],
            strict: bool = False) -> Comparison:
    """Join the two files on (cell_id, rank) and apply every rule to the cells that are ok
    in both; a cell ok in the baseline and not now is a regression. Raises CheckInputError
    when there is nothing to compare or a rule's column is missing."""
    columns = tuple(dict.fromkeys(rule.column for rule in rules))
    old_all, new_all = _rows(baseline, columns), _rows(results, columns)
    old = {key: row for key, row in old_all.items() if row["status"] == "ok"}
    new = {key: row for key, row in new_all.items() if row["status"] == "ok"}
    outcome = Comparison(strict=strict)
    outcome.only_in_baseline = sorted(f"{c} (rank {r})" for c, r in old_all.keys() - new_all.keys())
    outcome.only_in_results = sorted(f"{c} (rank {r})" for c, r in new_all.keys() - old_all.keys())
    outcome.no_longer_ok = sorted(f"{c} (rank {r}): {new_all[c, r]['status']}: {new_all[c, r].get('error', '')}"
                                  for c, r in old.keys() & new_all.keys() - new.keys())
    if not old.keys() & new.keys() and not outcome.no_longer_ok:
        raise CheckInputError(f"nothing to compare: no cell is ok in both {_names(baseline)} ({len(old)} ok) and "
                              f"{_names(results)} ({len(new)} ok); allowed: two results.csv of the same cells")
    for key in sorted(old.keys() & new.keys()):
        for rule in rules:
            before, after = old[key].get(rule.column, ""), new[key].get(rule.column, "")
            if before in ("", None):
                continue
            if after in ("", None):  # measured before, not now: as bad as a failed cell
                outcome.no_longer_ok.append(f"{key[0]} (rank {key[1]}): {rule.column} is empty")
                continue
            before_value, after_value = int(before), int(after)
            delta = after_value - before_value
            if after_value > rule.allowed(before_value):
                verdict = "REGRESSION"
            elif delta < 0:
                verdict = "improved"
            else:
                verdict = "ok"
            outcome.lines.append({"cell": key[0], "rank": key[1], "rule": str(rule), "column": rule.column,
                                  "baseline": before_value, "results": after_value, "delta": delta,
                                  "percent": (delta / before_value * 100) if before_value else 0.0,
                                  "verdict": verdict})
    if not outcome.lines and not outcome.no_longer_ok:
        raise CheckInputError(f"nothing to compare: the cells ok in both files have no value in "
                              f"{', '.join(columns)}; allowed: rules on columns that were measured")
    return outcome


def _names(places: Path | list[Path]) -> str:
    return ", ".join(str(p) for p in places) if isinstance(places, list) else str(places)


def render(comparison: Comparison, show_all: bool = False) -> str:
    """The diff table (regressions and improvements; every line with ``show_all``)."""
    shown = [line for line in comparison.lines if show_all or line["verdict"] != "ok"]
    out = []
    if shown:
        width = max(len(line["cell"]) for line in shown)
        out.append(f"{'cell':<{width}}  rank  {'field':<24} {'baseline':>14} {'results':>14} {'delta':>12} "
                   f"{'%':>8}  verdict")
        for line in shown:
            out.append(f"{line['cell']:<{width}}  {line['rank']:>4}  {line['column']:<24} {line['baseline']:>14,} "
                       f"{line['results']:>14,} {line['delta']:>+12,} {line['percent']:>+7.2f}%  {line['verdict']}")
    for cell in comparison.no_longer_ok:
        out.append(f"REGRESSION: ok in the baseline, not now: {cell}")
    regressions = len(comparison.regressions) + len(comparison.no_longer_ok)
    improved = sum(x["verdict"] == "improved" for x in comparison.lines)
    cells = len({(line["cell"], line["rank"]) for line in comparison.lines})
    out.append(f"bpmem check: {cells} cells compared, {regressions} regression(s), {improved} improvement(s)")
    for label, missing in (("only in the baseline", comparison.only_in_baseline),
                           ("only in the results", comparison.only_in_results)):
        if missing:
            kind = "error" if comparison.strict else "warning"
            out.append(f"bpmem check: {kind}: {len(missing)} cell(s) {label}: " + ", ".join(missing[:5])
                       + (" ..." if len(missing) > 5 else ""))
    return "\n".join(out)
