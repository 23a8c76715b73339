"""bpmem's pytest plugin (entry point ``pytest11``): tensor-memory limits and baselines.

- ``@pytest.mark.limit_tensor_memory(peak="12 MiB", saved="2 MiB", cuda_allocated=...)``
  measures the test body and fails *that test* when a figure exceeds its limit. The failure
  names the measured figure, the limit and the largest contributors, and the full numbers
  go in a report section named "bpmem".
- The ``bpmem`` fixture: ``with bpmem.measure(model) as m: step()`` (model optional), then
  ``m.saved_activation_bytes``, ``m.peak_bytes``, ``m.top_saved()``, ``m.top_live()``.
- Baselines for marked tests: ``--bpmem-save PATH`` writes every marked test's figures
  (JSON); ``--bpmem-compare PATH`` checks them against a saved file with the rules of
  ``--bpmem-compare-fail`` (``saved:0%``, ``peak:1MiB``; default ``saved:0% peak:0%``). Each
  option has an ini twin (``bpmem_save``, ``bpmem_compare``, ``bpmem_compare_fail``,
  ``bpmem_strict``). A missing baseline file or test is a warning, an error with
  ``--bpmem-strict``.

What is measured is ``bpmem.measure`` (``bpmem.measurement.api``) around the test body, with its two
definitions: ``saved`` is the most that autograd held for a backward at any moment
(parameters and buffers never count), ``peak`` the most that storages allocated in the body
held at once (a view of an older tensor allocates nothing); on CUDA also the caching
allocator's peak. A failed ``saved`` limit lists the largest saved tensors by module path
and op; a failed ``peak`` limit the largest storages live at the peak.

Bad input stops the run before any test, with one line and exit status 2: a marker keyword
other than ``peak``, ``saved``, ``cuda_allocated``; a limit that is negative, fractional
(``peak=1.5``) or not a size; a ``--bpmem-compare`` file that is not a ``--bpmem-save``
file; a ``--bpmem-save`` path that cannot be written; a rule on a figure the plugin does
not record.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bpmem.figures import PLUGIN_LIMITS
from bpmem.units import format_bytes, parse_bytes

LIMITS: dict[str, str] = PLUGIN_LIMITS  # the figures a marker may limit: saved, peak, cuda_allocated


class BpmemWarning(UserWarning):
    """A baseline problem that is not an error unless --bpmem-strict is given."""


def measure_block(model: Any = None, optimizer: Any = None) -> contextlib.AbstractContextManager[Any]:
    """``bpmem.measure`` (``bpmem.measurement.api``): the plugin and the fixture are this, nothing more."""
    from bpmem.measurement.api import measure

    return measure(model, optimizer)


class BpmemFixture:
    """The ``bpmem`` fixture: ``with bpmem.measure(model) as m: ...`` gives a ``bpmem.measurement.api.Measurement``
    (``m.saved_activation_bytes``, ``m.peak_bytes``, ``m.top_saved()``, ``m.top_live()``)."""

    def measure(self, model: Any = None, optimizer: Any = None) -> contextlib.AbstractContextManager[Any]:
        return measure_block(model, optimizer)


@pytest.fixture
def bpmem() -> BpmemFixture:
    """Measure tensor memory of a block: ``with bpmem.measure() as m: step()``."""
    return BpmemFixture()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bpmem", "tensor memory limits and baselines (bpmem)")
    group.addoption("--bpmem-save", metavar="PATH", help="write every limit_tensor_memory test's figures (JSON)")
    group.addoption("--bpmem-compare", metavar="PATH", help="compare marked tests with a --bpmem-save file")
    group.addoption("--bpmem-compare-fail", action="append", metavar="FIELD:TOL",
                    help="regression rule, e.g. saved:0%% peak:1MiB (repeatable; default saved:0%% peak:0%%)")
    group.addoption("--bpmem-strict", action="store_true", default=None,
                    help="a missing baseline (file or test) fails instead of warning")
    parser.addini("bpmem_save", "as --bpmem-save", default="")
    parser.addini("bpmem_compare", "as --bpmem-compare", default="")
    parser.addini("bpmem_compare_fail", "as --bpmem-compare-fail (one rule per line)", type="linelist", default=[])
    parser.addini("bpmem_strict", "as --bpmem-strict", type="bool", default=False)


@dataclass
class _Settings:
    save: Path | None
    compare: Path | None
    rules: list[Any]
    strict: bool
    baseline: dict[str, dict[str, int]] | None = None
    saved: dict[str, dict[str, int]] = field(default_factory=dict)


_SETTINGS = pytest.StashKey[_Settings]()


def pytest_configure(config: pytest.Config) -> None:
    from bpmem.results.check import parse_rule

    config.addinivalue_line("markers", "limit_tensor_memory(peak=None, saved=None, cuda_allocated=None): fail "
                                       "the test when its body's tensor memory exceeds a limit ('12 MiB' or bytes)")
    save = config.getoption("bpmem_save") or config.getini("bpmem_save") or None
    compare = config.getoption("bpmem_compare") or config.getini("bpmem_compare") or None
    rule_texts = config.getoption("bpmem_compare_fail") or config.getini("bpmem_compare_fail") or ["saved:0%",
                                                                                                     "peak:0%"]
    strict = config.getoption("bpmem_strict")
    strict = config.getini("bpmem_strict") if strict is None else strict
    try:
        rules = [parse_rule(text) for text in rule_texts]
    except ValueError as error:
        pytest.exit(f"bpmem: --bpmem-compare-fail / bpmem_compare_fail: {error}", returncode=2)
    for rule in rules:
        if rule.column not in LIMITS.values():
            pytest.exit(f"bpmem: --bpmem-compare-fail / bpmem_compare_fail: {rule.column} is not a figure the plugin "
                        f"records; allowed: {', '.join(LIMITS)}", returncode=2)
    settings = _Settings(Path(save) if save else None, Path(compare) if compare else None, rules, bool(strict))
    if settings.save is not None:
        problem = _unwritable(settings.save)
        if problem:
            pytest.exit(f"bpmem: --bpmem-save / bpmem_save: cannot write {settings.save}: {problem}; allowed: a "
                        "path in a folder you can write to", returncode=2)
    if settings.compare is not None:
        if settings.compare.is_file():
            try:
                settings.baseline = _baseline(settings.compare)
            except ValueError as error:
                pytest.exit(f"bpmem: --bpmem-compare / bpmem_compare: {settings.compare}: {error}; allowed: a file "
                            "written by --bpmem-save", returncode=2)
        elif settings.strict:
            pytest.exit(f"bpmem: --bpmem-compare: {settings.compare} does not exist (--bpmem-strict)", returncode=2)
        else:
            config.issue_config_time_warning(
                BpmemWarning(f"bpmem: no baseline at {settings.compare}; comparisons skipped"), stacklevel=2)
    config.stash[_SETTINGS] = settings


LIMIT_ALLOWED = "a whole number of bytes >= 0, or a size such as '12 MiB'"


def _limit(value: Any) -> int:
    """A limit in whole bytes: an int >= 0 or a size string; ValueError for anything else
    (a float such as 1.5 used to be truncated to 1 B)."""
    try:
        if isinstance(value, float):
            raise ValueError(value)
        return parse_bytes(value, whole=True)
    except ValueError:
        raise ValueError(f"{value!r} is not a limit; allowed: {LIMIT_ALLOWED}") from None


def _marker_limits(item: pytest.Item) -> dict[str, int] | None:
    """The marker's limits by column, None if the test has no marker; ValueError names the
    bad keyword or value."""
    marker = item.get_closest_marker("limit_tensor_memory")
    if marker is None:
        return None
    unknown = sorted(set(marker.kwargs) - set(LIMITS))
    if unknown or marker.args:
        bad = f"keyword {unknown[0]!r}" if unknown else f"positional argument {marker.args[0]!r}"
        raise ValueError(f"limit_tensor_memory: unknown {bad}; allowed keywords: {', '.join(LIMITS)}")
    limits = {}
    for key, value in marker.kwargs.items():
        if value is None:
            continue
        try:
            limits[LIMITS[key]] = _limit(value)
        except ValueError as error:
            raise ValueError(f"limit_tensor_memory({key}=...): {error}") from None
    return limits


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check every marker before any test runs: a typo must not pass silently."""
    for item in items:
        try:
            _marker_limits(item)
        except ValueError as error:
            pytest.exit(f"bpmem: {item.nodeid}: {error}", returncode=2)


def _unwritable(path: Path) -> str:
    """Why ``path`` could not be written at the end of the session ("" if it can)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if path.is_dir():
        return "it is a folder"
    target = path if path.exists() else folder
    return "" if os.access(target, os.W_OK) else f"{target} is not writable"


def _baseline(path: Path) -> dict[str, dict[str, int]]:
    """A --bpmem-save file: {test id: {figure column: bytes}}; ValueError says what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot be read ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError("not an object of test ids")
    for test, figures in data.items():
        if not isinstance(figures, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in figures.values()):
            raise ValueError(f"{test!r} does not map figure names to whole bytes")
    return data


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    limits = _marker_limits(item)  # checked at collection: cannot raise here
    if limits is None:
        return (yield)
    with measure_block() as measured:
        result = yield
    settings = item.config.stash[_SETTINGS]
    figures = measured.figures()
    settings.saved[item.nodeid] = figures
    problems = [f"{column} {format_bytes(figures[column])} ({figures[column]:,} B) exceeds the limit "
                f"{format_bytes(limit)} ({limit:,} B)" for column, limit in limits.items()
                if column in figures and figures[column] > limit]
    problems += _compare(item, settings, figures)
    lines = [f"{column}: {value:,} B ({format_bytes(value)})" for column, value in figures.items()]
    lines += [f"limit {column}: {limit:,} B" for column, limit in limits.items()]
    lines += ["largest saved tensors when the saved figure peaked (module (op that made it)):"]
    lines += [f"  {name}: {nbytes:,} B ({format_bytes(nbytes)})" for name, nbytes in measured.top_saved()]
    lines += ["largest storages live at the peak (module (op that made it)):"]
    lines += [f"  {name}: {nbytes:,} B ({format_bytes(nbytes)})" for name, nbytes in measured.top_live()]
    lines += [f"at the peak: {measured.peak_breakdown}"]
    item.add_report_section("call", "bpmem", "\n".join(lines))
    if problems:
        over_saved = "saved_activation_bytes" in limits and figures["saved_activation_bytes"] > limits[
            "saved_activation_bytes"]
        top_list = measured.top_saved(3) if over_saved else measured.top_live(3)
        kind = "largest saved tensors" if over_saved else "largest live at the peak"
        top = ", ".join(f"{name} {format_bytes(nbytes)}" for name, nbytes in top_list)
        pytest.fail("bpmem: " + "; ".join(problems) + (f"; {kind}: {top}" if top else ""), pytrace=False)
    return result


def _compare(item: pytest.Item, settings: _Settings, figures: dict[str, int]) -> list[str]:
    if settings.baseline is None:
        return []
    before = settings.baseline.get(item.nodeid)
    if before is None:
        message = f"bpmem: {item.nodeid} is not in the baseline {settings.compare}"
        if settings.strict:
            return [message + " (--bpmem-strict)"]
        warnings.warn(BpmemWarning(message), stacklevel=1)
        return []
    problems = []
    for rule in settings.rules:
        if rule.column not in before or rule.column not in figures:
            continue
        if figures[rule.column] > rule.allowed(before[rule.column]):
            problems.append(f"{rule.column} {figures[rule.column]:,} B regressed from {before[rule.column]:,} B "
                            f"(rule {rule})")
    return problems


def pytest_sessionfinish(session: pytest.Session) -> None:
    settings = session.config.stash.get(_SETTINGS, None)
    if settings is not None and settings.save is not None and settings.saved:
        try:
            settings.save.parent.mkdir(parents=True, exist_ok=True)
            settings.save.write_text(json.dumps(settings.saved, indent=1, sort_keys=True) + "\n")
        except OSError as error:  # checked at start; the folder changed since
            session.config.get_terminal_writer().line(f"bpmem: --bpmem-save: cannot write {settings.save}: "
                                                      f"{error.strerror}", red=True)
            session.exitstatus = 2
