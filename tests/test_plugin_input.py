"""The pytest plugin's bad input: one line naming the problem and what is allowed, exit
status 2, before any test runs; never an INTERNALERROR, never a limit silently truncated."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow  # each test runs pytest in a subprocess

MARKED = """
import pytest
import torch


@pytest.mark.limit_tensor_memory({limit})
def test_step():
    x = torch.ones(256, requires_grad=True)
    (x * x).sum().backward()
"""


def _run(pytester: pytest.Pytester, limit: str, *args: str) -> tuple[int, str]:
    pytester.makepyfile(MARKED.format(limit=limit))
    result = pytester.runpytest_subprocess(*args)
    return result.ret, result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize("limit,names", [
    ('peek="1 MiB"', "unknown keyword 'peek'; allowed keywords: peak, saved, cuda_allocated"),
    ("peak=1.5", "1.5 is not a limit; allowed: a whole number of bytes"),
    ("saved=-1", "-1 is not a limit"),
    ('peak="1.5"', "'1.5' is not a limit"),
    ('peak="lots"', "'lots' is not a limit"),
    ('"1 MiB"', "unknown positional argument '1 MiB'"),
])
def test_a_bad_marker_stops_the_run_with_one_line(pytester: pytest.Pytester, limit: str, names: str) -> None:
    code, out = _run(pytester, limit)
    assert code == 2, out
    assert names in out and "test_step" in out
    assert "Traceback" not in out and "INTERNALERROR" not in out


def test_sizes_with_units_are_still_limits(pytester: pytest.Pytester) -> None:
    code, out = _run(pytester, 'peak="1.5 MiB", saved=1048576')
    assert code == 0, out


def test_a_malformed_baseline_is_exit_2(pytester: pytest.Pytester) -> None:
    for text in ("{not json", "[1, 2]", '{"t": {"peak_bytes": 1.5}}', '{"t": 3}'):
        Path(pytester.path, "base.json").write_text(text)
        code, out = _run(pytester, "peak=10**9", "--bpmem-compare", "base.json")
        assert code == 2, (text, out)
        assert "--bpmem-compare" in out and "allowed: a file written by --bpmem-save" in out
        assert "Traceback" not in out and "INTERNALERROR" not in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_saving_into_a_read_only_folder_is_exit_2_as_non_root(pytester: pytest.Pytester) -> None:
    folder = Path(pytester.path, "locked")
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, out = _run(pytester, "peak=10**9", "--bpmem-save", str(folder / "base.json"))
    finally:
        folder.chmod(0o700)
    assert code == 2 and "cannot write" in out, out


def test_saving_where_a_folder_is_in_the_way_is_exit_2(pytester: pytest.Pytester) -> None:
    """A path that can never be written, whoever runs the tests (root included)."""
    Path(pytester.path, "base.json").mkdir()
    code, out = _run(pytester, "peak=10**9", "--bpmem-save", "base.json")
    assert code == 2 and "cannot write base.json: it is a folder" in out, out


@pytest.mark.parametrize("rule", ["inference_peak:0%", "params:0%", "grads:1MiB"])
def test_a_rule_on_a_figure_the_plugin_never_records_is_exit_2(pytester: pytest.Pytester, rule: str) -> None:
    code, out = _run(pytester, "peak=10**9", "--bpmem-compare-fail", rule)
    assert code == 2, out
    assert "is not a figure the plugin records; allowed: peak, saved, cuda_allocated" in out
