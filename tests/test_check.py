"""``bpmem check``: rules, exit codes, and a grown activation failing the self-check."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import bpmem.model
from bpmem.check import BytesRule, PercentRule, RuleError, parse_rule
from bpmem.cli import main

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


def test_a_grown_activation_fails_the_self_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The CI self-check in miniature: a baseline from the CI config's cells, then the same
    sweep with a ReLU that keeps more, checked with the rules .ci/test uses."""
    config = tmp_path / "ci.toml"
    config.write_text((REPO_ROOT / "benchmarks/configs/ci.toml").read_text()
                      .replace('activation = ["relu", "gelu"]', 'activation = "relu"')
                      .replace('modes = ["train", "inference", "hvp"]', 'modes = ["train"]'))
    base, grown = tmp_path / "base", tmp_path / "grown"
    assert main(["run", "--config", str(config), "--out", str(base), "--quiet", "--no-report"]) == 0
    rules = ["--fail", "saved:0%", "--fail", "peak:0%", "--strict"]
    assert main(["check", "--baseline", str(base / "results.csv"), "--results", str(base / "results.csv"),
                 *rules]) == 0
    monkeypatch.setitem(bpmem.model._ACTIVATION_MODULES, "relu", _GreedyReLU)
    assert main(["run", "--config", str(config), "--out", str(grown), "--quiet", "--no-report"]) == 0
    capsys.readouterr()
    assert main(["check", "--baseline", str(base / "results.csv"), "--results", str(grown / "results.csv"),
                 *rules]) == 1
    assert "saved_activation_bytes" in capsys.readouterr().out
