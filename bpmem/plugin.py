"""bpmem's pytest plugin (entry point ``pytest11``): tensor-memory limits and baselines.

- ``@pytest.mark.limit_tensor_memory(peak="12 MiB", saved="2 MiB", cuda_allocated=...)``
  measures the test body and fails *that test* when a figure exceeds its limit. The failure
  names the measured figure, the limit and the largest contributors, and the full numbers
  go in a report section named "bpmem".
- The ``bpmem`` fixture: ``with bpmem.measure() as m: step()``, then
  ``m.saved_activation_bytes``, ``m.peak_bytes``, ``m.cuda_max_allocated_bytes``.
- Baselines for marked tests: ``--bpmem-save PATH`` writes every marked test's figures
  (JSON); ``--bpmem-compare PATH`` checks them against a saved file with the rules of
  ``--bpmem-compare-fail`` (``saved:0%``, ``peak:1MiB``; default ``saved:0% peak:0%``). Each
  option has an ini twin (``bpmem_save``, ``bpmem_compare``, ``bpmem_compare_fail``,
  ``bpmem_strict``). A missing baseline file or test is a warning, an error with
  ``--bpmem-strict``.

What is measured: tensor storages created inside the test body (``LiveTensorProbe``: peak
and the ops that made what was live then), what autograd saved there
(``SavedTensorProbe``), and on CUDA the caching allocator's peak (``CudaProbe``).
Tensors that existed before the test body do not count.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bpmem.units import format_bytes, parse_bytes

LIMITS = {"peak": "peak_bytes", "saved": "saved_activation_bytes", "cuda_allocated": "cuda_max_allocated_bytes"}


class BpmemWarning(UserWarning):
    """A baseline problem that is not an error unless --bpmem-strict is given."""


@dataclass
class TestMeasurement:
    """Figures of one measured block (bytes)."""

    saved_activation_bytes: int = 0
    peak_bytes: int = 0
    cuda_max_allocated_bytes: int | None = None
    top_contributors: list[tuple[str, int]] = field(default_factory=list)

    def figures(self) -> dict[str, int]:
        out = {"saved_activation_bytes": self.saved_activation_bytes, "peak_bytes": self.peak_bytes}
        if self.cuda_max_allocated_bytes is not None:
            out["cuda_max_allocated_bytes"] = self.cuda_max_allocated_bytes
        return out


@contextlib.contextmanager
def measure_block() -> Iterator[TestMeasurement]:
    import torch

    from bpmem.probes import CudaProbe, LiveTensorProbe, SavedTensorProbe

    result = TestMeasurement()
    live, saved = LiveTensorProbe(record_timeline=False), SavedTensorProbe(exclude_leaf_params=True)
    live.track_ops = True
    cuda = CudaProbe() if torch.cuda.is_available() else None
    with contextlib.ExitStack() as stack:
        if cuda is not None:
            stack.enter_context(cuda)
        stack.enter_context(live)
        stack.enter_context(saved)
        yield result
    result.saved_activation_bytes = saved.saved_activation_bytes
    result.peak_bytes = live.peak_bytes
    result.top_contributors = sorted(live.peak_by_op.items(), key=lambda item: -item[1])[:5]
    if cuda is not None:
        result.cuda_max_allocated_bytes = cuda.cuda_max_allocated_bytes


class BpmemFixture:
    """The ``bpmem`` fixture: ``with bpmem.measure() as m: ...`` gives a TestMeasurement."""

    def measure(self) -> contextlib.AbstractContextManager[TestMeasurement]:
        return measure_block()


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
    from bpmem.check import parse_rule

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
        raise pytest.UsageError(f"--bpmem-compare-fail / bpmem_compare_fail: {error}") from None
    settings = _Settings(Path(save) if save else None, Path(compare) if compare else None, rules, bool(strict))
    if settings.compare is not None:
        if settings.compare.is_file():
            settings.baseline = json.loads(settings.compare.read_text())
        elif settings.strict:
            raise pytest.UsageError(f"--bpmem-compare: {settings.compare} does not exist (--bpmem-strict)")
        else:
            config.issue_config_time_warning(
                BpmemWarning(f"bpmem: no baseline at {settings.compare}; comparisons skipped"), stacklevel=2)
    config.stash[_SETTINGS] = settings


def _limit(value: Any) -> int:
    return parse_bytes(value) if isinstance(value, str) else int(value)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    marker = item.get_closest_marker("limit_tensor_memory")
    if marker is None:
        return (yield)
    unknown = set(marker.kwargs) - set(LIMITS)
    if unknown or marker.args:
        raise pytest.UsageError(f"limit_tensor_memory: unknown limit {sorted(unknown) or marker.args}; "
                                f"allowed keywords: {', '.join(LIMITS)}")
    limits = {LIMITS[key]: _limit(value) for key, value in marker.kwargs.items() if value is not None}
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
    lines += ["largest contributors at the peak (by the op that made them):"]
    lines += [f"  {op}: {nbytes:,} B ({format_bytes(nbytes)})" for op, nbytes in measured.top_contributors]
    item.add_report_section("call", "bpmem", "\n".join(lines))
    if problems:
        top = ", ".join(f"{op} {format_bytes(nbytes)}" for op, nbytes in measured.top_contributors[:3])
        pytest.fail("bpmem: " + "; ".join(problems) + (f"; largest contributors: {top}" if top else ""),
                    pytrace=False)
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
        settings.save.parent.mkdir(parents=True, exist_ok=True)
        settings.save.write_text(json.dumps(settings.saved, indent=1, sort_keys=True) + "\n")
