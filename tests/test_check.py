"""``bpmem check``: rules, exit codes, and a grown activation failing the self-check."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pandas as pd
import pytest
import toml_text
import torch
from torch import nn

import bpmem.models.mlp
from bpmem.cli import main
from bpmem.results.check import BytesRule, PercentRule, RuleError, parse_rule
from bpmem.sweep.config import parse_config

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "results.csv"


def _edited(tmp_path: Path, change) -> Path:
    frame = pd.read_csv(FIXTURE, dtype=str, keep_default_na=False)
    changed = change(frame)  # edits in place and returns None, or returns a new frame
    frame = frame if changed is None else changed
    path = tmp_path / "results.csv"
    frame.to_csv(path, index=False)
    return path


def test_rules_parse_from_field_and_tolerance() -> None:
    assert parse_rule("saved:0%") == PercentRule("saved_activation_bytes", 0.0)
    assert parse_rule("peak:2.5%") == PercentRule("peak_bytes", 2.5)
    assert parse_rule("peak:1MiB") == BytesRule("peak_bytes", 1024 * 1024)
    assert parse_rule("cuda_allocated:0%").column == "cuda_max_allocated_bytes"
    for bad in ("saved", "saved:lots", "speed:1%", ":1%"):
        with pytest.raises(RuleError):
            parse_rule(bad)


def test_identical_files_pass(capsys) -> None:
    assert main(["check", "--baseline", str(FIXTURE), "--results", str(FIXTURE), "--fail", "saved:0%"]) == 0
    assert "0 regression(s)" in capsys.readouterr().out


def test_one_byte_more_saved_fails_under_zero_percent(tmp_path: Path, capsys) -> None:
    def grow(frame: pd.DataFrame) -> None:
        frame.loc[0, "saved_activation_bytes"] = str(int(frame.loc[0, "saved_activation_bytes"]) + 1)

    results = _edited(tmp_path, grow)
    assert main(["check", "--baseline", str(FIXTURE), "--results", str(results), "--fail", "saved:0%"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "+1" in out
    # the same byte is within a 1 KiB allowance
    assert main(["check", "--baseline", str(FIXTURE), "--results", str(results), "--fail", "saved:1KiB"]) == 0


def test_improvements_are_reported_and_pass(tmp_path: Path, capsys) -> None:
    def shrink(frame: pd.DataFrame) -> None:
        frame.loc[0, "peak_bytes"] = str(int(frame.loc[0, "peak_bytes"]) - 100)

    assert main(["check", "--baseline", str(FIXTURE), "--results", str(_edited(tmp_path, shrink))]) == 0
    assert "improved" in capsys.readouterr().out


def test_missing_cells_warn_or_fail_under_strict(tmp_path: Path, capsys) -> None:
    results = _edited(tmp_path, lambda frame: frame.drop(index=0))
    assert main(["check", "--baseline", str(FIXTURE), "--results", str(results)]) == 0
    assert "warning" in capsys.readouterr().out
    assert main(["check", "--baseline", str(FIXTURE), "--results", str(results), "--strict"]) == 1


def test_bad_arguments_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["check", "--baseline", str(FIXTURE), "--results", str(FIXTURE), "--fail", "speed:1%"]) == 2
    assert "--fail" in capsys.readouterr().err
    assert main(["check", "--baseline", str(tmp_path / "nope.csv"), "--results", str(FIXTURE)]) == 2
    assert "--baseline" in capsys.readouterr().err


class _GreedyReLU(nn.Module):
    """ReLU that also keeps exp(h) for backward: one more activation per layer, on purpose."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).exp().log()


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_a_grown_activation_fails_the_self_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The CI self-check in miniature: a baseline from the CI config's cells, then the same
    sweep with a ReLU that keeps more, checked with the rules .ci/test uses."""
    ci = tomllib.loads((REPO_ROOT / "benchmarks/configs/ci.toml").read_text())
    ci["model"]["activation"], ci["modes"] = "relu", ["train"]
    assert parse_config(ci).cells()  # the edit kept a valid config with cells
    config = tmp_path / "ci.toml"
    config.write_text(toml_text.dumps(ci))
    base, grown = tmp_path / "base", tmp_path / "grown"
    assert main(["run", "--config", str(config), "--out", str(base), "--quiet", "--no-report"]) == 0
    rules = ["--fail", "saved:0%", "--fail", "peak:0%", "--strict"]
    assert main(["check", "--baseline", str(base / "results.csv"), "--results", str(base / "results.csv"),
                 *rules]) == 0
    monkeypatch.setitem(bpmem.models.mlp._ACTIVATION_MODULES, "relu", _GreedyReLU)
    assert main(["run", "--config", str(config), "--out", str(grown), "--quiet", "--no-report"]) == 0
    capsys.readouterr()
    assert main(["check", "--baseline", str(base / "results.csv"), "--results", str(grown / "results.csv"),
                 *rules]) == 1
    assert "saved_activation_bytes" in capsys.readouterr().out


# -- a gate that cannot pass by mistake (each of these exited 0 before) --------------------

def _check(baseline: Path, results: Path, *rules: str) -> list[str]:
    return ["check", "--baseline", str(baseline), "--results", str(results), *(f"--fail={r}" for r in rules)]


def test_a_rule_column_missing_from_the_results_is_bad_input(tmp_path: Path, capsys) -> None:
    results = _edited(tmp_path, lambda frame: frame.drop(columns=["saved_activation_bytes"]))
    assert main([*_check(FIXTURE, results, "saved:0%"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "has no column 'saved_activation_bytes'" in err and str(results) in err


def test_a_cell_ok_before_and_oom_now_is_a_regression_without_strict(tmp_path: Path, capsys) -> None:
    def fail_first(frame: pd.DataFrame) -> None:
        frame.loc[0, ["status", "error", "saved_activation_bytes", "peak_bytes"]] = ["oom", "out of memory", "", ""]

    results = _edited(tmp_path, fail_first)
    assert main(_check(FIXTURE, results, "saved:0%")) == 1
    out = capsys.readouterr().out
    cell = pd.read_csv(FIXTURE).cell_id[0]
    assert f"REGRESSION: ok in the baseline, not now: {cell} (rank 0): oom: out of memory" in out


def test_a_measured_figure_gone_empty_is_a_regression(tmp_path: Path, capsys) -> None:
    results = _edited(tmp_path, lambda frame: frame.loc.__setitem__((0, "peak_bytes"), ""))
    assert main(_check(FIXTURE, results, "peak:0%")) == 1
    assert "peak_bytes is empty" in capsys.readouterr().out


@pytest.mark.parametrize("text,names", [
    ("", "is empty"),
    ("cell_id,status,saved_activation_bytes\n", "nothing to compare"),
    ('cell_id,status,saved_activation_bytes\n"a,ok,1\n', "not a CSV file"),
    ("cell_id,status,saved_activation_bytes\na,ok,1,2\n", "line 2: 4 fields, the header has 3"),
    ("cell_id,status,saved_activation_bytes\na,ok,1.5\n", "saved_activation_bytes is '1.5'; allowed: an integer"),
    ("cell_id,status,saved_activation_bytes\na,fine,1\n", "status 'fine'; allowed: ok, oom, error, skipped"),
    ("cell_id,status,saved_activation_bytes\na,ok,1\na,ok,2\n", "already on line 2"),
])
def test_malformed_or_empty_results_are_exit_2_never_1(tmp_path: Path, capsys, text: str, names: str) -> None:
    results = tmp_path / "results.csv"
    results.write_text(text)
    assert main(_check(FIXTURE, results, "saved:0%")) == 2
    assert names in capsys.readouterr().err


def test_cells_with_nothing_in_common_are_nothing_to_compare(tmp_path: Path, capsys) -> None:
    results = _edited(tmp_path, lambda frame: frame.assign(cell_id=frame.cell_id + "-other"))
    assert main(_check(FIXTURE, results, "saved:0%")) == 2
    assert "nothing to compare" in capsys.readouterr().err


def test_a_rule_on_a_column_never_measured_is_nothing_to_compare(tmp_path: Path, capsys) -> None:
    """A rule on a CUDA column against CPU-only results names the column they lack."""
    assert main(_check(FIXTURE, FIXTURE, "cuda_allocated:0%")) == 2
    assert "cuda_max_allocated_bytes" in capsys.readouterr().err
