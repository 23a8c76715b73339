"""The pytest plugin, driven by pytester: limits, the fixture, ini options, baselines."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow  # each test runs pytest in a subprocess

BODY = """
import pytest, torch

def step(batch):
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    x = torch.randn(batch, 256)
    model(x).sum().backward()
"""


def test_over_the_limit_fails_with_figures_limit_and_contributors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BODY + """
@pytest.mark.limit_tensor_memory(saved="1 KiB")
def test_big():
    step(64)
""")
    result = pytester.runpytest_subprocess("-rA")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "saved_activation_bytes" in out and "exceeds the limit 1.0 KiB (1,024 B)" in out
    # a failed saved limit names the saved tensors by module (class names: no model given) and op
    assert "largest saved tensors: Linear (randn) 64.0 KiB, ReLU (relu) 64.0 KiB" in out
    assert "Captured bpmem call" in out  # the named report section


def test_a_failed_peak_limit_names_what_was_live(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BODY + """
@pytest.mark.limit_tensor_memory(peak="1 KiB")
def test_big():
    step(64)
""")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    assert "peak_bytes" in result.stdout.str() and "largest live at the peak: " in result.stdout.str()


def test_the_fixture_inside_a_marked_test_leaves_both_figures_right(pytester: pytest.Pytester) -> None:
    """Nesting: the fixture's measurement no longer hides the block from the marker."""
    pytester.makepyfile(BODY + """
@pytest.mark.limit_tensor_memory(saved=131071)
def test_nested(bpmem):
    with bpmem.measure() as inner:
        step(64)
    assert inner.saved_activation_bytes == 131072
""")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)  # the marker saw the same 131,072 B: one byte over
    assert "saved_activation_bytes 128.0 KiB (131,072 B) exceeds the limit" in result.stdout.str()


def test_under_the_limit_passes_and_only_that_test_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BODY + """
@pytest.mark.limit_tensor_memory(peak="64 MiB", saved="8 MiB")
def test_small():
    step(4)

@pytest.mark.limit_tensor_memory(peak=100)
def test_tiny_limit():
    step(4)

def test_unmarked():
    step(4)
""")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2, failed=1)
    assert "test_tiny_limit" in result.stdout.str()


def test_fixture_measures_a_block(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BODY + """
def test_fixture(bpmem):
    with bpmem.measure() as small:
        step(4)
    with bpmem.measure() as large:
        step(64)
    assert 0 < small.saved_activation_bytes < large.saved_activation_bytes
    assert large.peak_bytes > large.saved_activation_bytes
    # the input batch and the ReLU output (also the next Linear's input): 64 x 256 floats each
    assert large.saved_activation_bytes == 2 * 64 * 256 * 4
""")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_save_then_compare_catches_a_regression_via_ini(pytester: pytest.Pytester,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_mem=BODY + """
import os
@pytest.mark.limit_tensor_memory(peak="1 GiB")
def test_step():
    step(int(os.environ.get("BATCH", "8")))
""")
    baseline = pytester.path / "baseline.json"
    pytester.makeini(f"[pytest]\nbpmem_save = {baseline}\n")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    saved = json.loads(baseline.read_text())
    assert list(saved) == ["test_mem.py::test_step"] and saved["test_mem.py::test_step"]["saved_activation_bytes"] > 0

    pytester.makeini(f"[pytest]\nbpmem_compare = {baseline}\nbpmem_compare_fail =\n    saved:0%\n")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)  # same batch: no regression
    monkeypatch.setenv("BATCH", "9")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    assert "regressed from" in result.stdout.str()


def test_missing_baseline_is_a_warning_unless_strict(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BODY + """
@pytest.mark.limit_tensor_memory(peak="1 GiB")
def test_step():
    step(4)
""")
    result = pytester.runpytest_subprocess("--bpmem-compare", "nowhere.json")
    result.assert_outcomes(passed=1)
    assert "no baseline" in result.stdout.str()
    strict = pytester.runpytest_subprocess("--bpmem-compare", "nowhere.json", "--bpmem-strict")
    assert strict.ret == 2
    assert "nowhere.json does not exist" in strict.stdout.str() + strict.stderr.str()


def test_cuda_test_skips_cleanly_without_a_gpu(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
import pytest, torch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.limit_tensor_memory(cuda_allocated="64 MiB")
def test_on_gpu():
    x = torch.randn(1024, 1024, device="cuda")
    (x @ x).sum()
""")
    result = pytester.runpytest_subprocess()
    import torch

    if torch.cuda.is_available():
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(skipped=1)
