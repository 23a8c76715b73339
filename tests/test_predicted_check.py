"""``bpmem check --predicted``: each row's measured figures against its own predictions, and
benchmarks/gpu_check.sh's dry run end to end.

The results files come from a real tiny sweep (``bpmem run``); edits derive every figure from
what the sweep wrote, so no expected byte count is written here.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import toml_text
from test_shipped_configs import shrunk

from bpmem.cli import main
from bpmem.figures import PREDICTED_FIGURES

REPO_ROOT = Path(__file__).resolve().parent.parent
Rows = list[dict[str, str]]

TINY = {
    "name": "tiny", "batch_sizes": [4, 8], "devices": ["cpu"], "modes": ["train", "inference", "hvp"],
    "strategies": ["none", "checkpoint-sqrt"], "repeats": 1, "warmup": 0,
    "model": {"input_dim": 12, "hidden_dim": 8, "output_dim": 3, "depth": 2, "optimizer": "adam"},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder written by ``bpmem run`` on a tiny CPU grid."""
    root = tmp_path_factory.mktemp("predicted")
    config = root / "tiny.toml"
    config.write_text(toml_text.dumps(TINY))
    out = root / "run"
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet", "--no-report"]) == 0
    return out


def _read(path: Path) -> tuple[list[str], Rows]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _edited(run_dir: Path, tmp_path: Path, change: Callable[[list[str], Rows], tuple[list[str], Rows] | None]) -> Path:
    """A copy of the run's results.csv with ``change`` applied (in place, or a new header and rows)."""
    header, rows = _read(run_dir / "results.csv")
    changed = change(header, rows)
    header, rows = changed if changed is not None else (header, rows)
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows([{k: row[k] for k in header} for row in rows])
    return path


def _first_train_row(rows: Rows) -> dict[str, str]:
    return next(row for row in rows if row["status"] == "ok" and row["mode"] == "train")


def test_the_sweep_matches_its_predictions(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every predicted figure of every row, the peaks of the checkpointed and the hvp rows
    included (their predicted peak is a dry run's, which an upper estimate would not meet)."""
    _, rows = _read(run_dir / "results.csv")
    assert rows and all(row["status"] == "ok" for row in rows)
    assert {row["mode"] for row in rows} == {"train", "inference", "hvp"}
    assert {row["strategy"] for row in rows} == {"none", "checkpoint-sqrt"}
    for row in rows:
        for figure in PREDICTED_FIGURES:
            assert row[figure] == row[f"predicted_{figure}"], (row["cell_id"], figure)
        if row["mode"] == "train":
            assert row["recompute_flops"] == row["predicted_recompute_flops"], row["cell_id"]
    code = main(["check", "--predicted", str(run_dir), "--fail", "saved:0%", "--fail", "params:0%",
                 "--fail", "grads:0%", "--fail", "optimizer:0%", "--fail", "peak:0%", "--fail", "inference_peak:0%"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{len(rows)} row(s) compared, 0 failure(s)" in out
    assert "saved ±0%" in out and "peak ±0%" in out
    shown = main(["check", "--predicted", str(run_dir), "--fail", "saved:0%"])
    assert shown == 0 and " peak " in capsys.readouterr().out  # without a rule the peak is shown, not judged
    # the default rule is saved:0%, and a results.csv path works as well as its folder
    assert main(["check", "--predicted", str(run_dir / "results.csv")]) == 0


@pytest.mark.parametrize("offset", [1, -1])
def test_saved_off_its_prediction_by_one_byte_fails_either_way(run_dir: Path, tmp_path: Path, offset: int,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    def shift(header: list[str], rows: Rows) -> None:
        row = _first_train_row(rows)
        row["saved_activation_bytes"] = str(int(row["predicted_saved_activation_bytes"]) + offset)

    results = _edited(run_dir, tmp_path, shift)
    assert main(["check", "--predicted", str(results), "--fail", "saved:0%"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and f"{offset:+d} B" in out and "1 failure(s)" in out
    # within a one-byte allowance, and not a matter for the other figures
    assert main(["check", "--predicted", str(results), "--fail", "saved:1"]) == 0
    assert main(["check", "--predicted", str(results), "--fail", "params:0%"]) == 0


def test_the_cuda_allocator_peak_is_compared_with_its_rounded_prediction(run_dir: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """No GPU here: the CUDA columns are written as twice the predicted CUDA-allocated peak
    (the peak with every storage rounded to the allocator's 512 B blocks), which is what
    max_memory_allocated is compared with."""
    def add_cuda(header: list[str], rows: Rows) -> tuple[list[str], Rows]:
        for row in rows:
            rounded = int(row["predicted_peak_bytes"]) + 4096  # a stand-in for the rounded figure
            row["predicted_cuda_allocated_bytes"] = str(rounded)
            row["cuda_max_allocated_bytes"] = row["cuda_max_reserved_bytes"] = str(2 * rounded)
        return header + ["cuda_max_allocated_bytes", "cuda_max_reserved_bytes", "predicted_cuda_allocated_bytes"], rows

    results = _edited(run_dir, tmp_path, add_cuda)
    assert main(["check", "--predicted", str(results)]) == 0  # shown, not judged
    out = capsys.readouterr().out
    assert "cuda_allocated" in out and "2.000" in out
    assert main(["check", "--predicted", str(results), "--fail", "cuda_allocated:50%"]) == 1
    assert main(["check", "--predicted", str(results), "--fail", "cuda_allocated:100%"]) == 0


def test_a_missing_predicted_column_is_bad_input(run_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def drop(header: list[str], rows: Rows) -> tuple[list[str], Rows]:
        return [c for c in header if c != "predicted_saved_activation_bytes"], rows

    results = _edited(run_dir, tmp_path, drop)
    assert main(["check", "--predicted", str(results), "--fail", "saved:0%"]) == 2
    err = capsys.readouterr().err
    assert "--predicted" in err and "predicted_saved_activation_bytes" in err and err.count("\n") == 1


def test_a_file_without_ok_rows_compares_nothing(run_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def fail_all(header: list[str], rows: Rows) -> None:
        for row in rows:
            row["status"], row["error"] = "oom", "OutOfMemoryError: CUDA out of memory"

    results = _edited(run_dir, tmp_path, fail_all)
    assert main(["check", "--predicted", str(results)]) == 2
    err = capsys.readouterr().err
    assert "nothing compared" in err and "--predicted" in err


def test_rows_not_ok_are_listed_and_error_rows_fail_with_strict(run_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    def one_error(header: list[str], rows: Rows) -> None:
        row = _first_train_row(rows)
        row["status"], row["error"] = "error", "RuntimeError: boom"

    results = _edited(run_dir, tmp_path, one_error)
    assert main(["check", "--predicted", str(results)]) == 0
    out = capsys.readouterr().out
    assert "not compared:" in out and "RuntimeError: boom" in out and "1 row(s) not ok" in out
    assert main(["check", "--predicted", str(results), "--strict"]) == 1
    assert "FAIL:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [
    (["--predicted", "RUN", "--baseline", "RUN"], "--predicted"),
    (["--baseline", "RUN"], "--results"),
    ([], "--baseline"),
    (["--predicted", "nowhere"], "--predicted"),
    (["--predicted", "RUN", "--fail", "predicted_peak_bytes:0%"], "--predicted"),
    (["--predicted", "RUN", "--fail", "speed:1%"], "--fail"),
])
def test_bad_usage_names_the_flag(run_dir: Path, argv: list[str], flag: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    assert main(["check", *argv]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "allowed" in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_on_the_cpu(tmp_path: Path) -> None:
    """``DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh``: the tiny config and a split
    config run, are checked against their predictions, and the summary holds both checks."""
    out = tmp_path / "gc"
    # split.toml as shipped, every strategy, runs in test_shipped_configs.py; this test is of the
    # script's steps and summary, so its split step runs the plain step and one torchrun cell
    shipped = shrunk(tomllib.loads((REPO_ROOT / "benchmarks" / "configs" / "split.toml").read_text()))
    split = tmp_path / "split.toml"
    split.write_text(toml_text.dumps(dict(shipped, strategies=["none", {"name": "ddp", "world_size": 2}])))
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "OUT": str(out), "PYTHON": sys.executable,
           "SPLIT_CONFIG": str(split)}
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    for name in ("gpu-dry-run", "split"):
        assert (out / name / "results.csv").is_file()
        check = (out / name / "check.txt").read_text()
        assert " 0 failure(s)" in check and "0 row(s) not ok" in check, check
        assert f"## {name}: bpmem check --predicted" in summary
        assert check.strip().splitlines()[-1] in summary
    assert "0 failure(s)" in (out / "gpu_check.log").read_text().splitlines()[-1]
