"""Memory traces in PyTorch's snapshot format: written from the live probe on the CPU, opened
by PyTorch's own ``torch.cuda._memory_viz``, and peaking at exactly the row's peak."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from bpmem.cli import main
from bpmem.measurement.cell import measure
from bpmem.measurement.memory_trace import peak_of_trace, snapshot_from_allocations, write_snapshot
from bpmem.spec import MLPSpec
from bpmem.strategies.registry import make_step


def viz(*args: str) -> subprocess.CompletedProcess[str]:
    """PyTorch's memory viewer, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "torch.cuda._memory_viz", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("strategy", ["none", "checkpoint-sqrt", "checkpoint-selective"])
def test_the_trace_peaks_at_the_measured_peak(strategy: str) -> None:
    spec, step = MLPSpec(depth=4, activation="tanh"), make_step(strategy, batch_size=64, optimizer="adam")
    measured = measure(spec, step, trace=True)
    assert measured.trace is not None and "trace" not in measured.to_dict()
    assert peak_of_trace(measured.trace) == measured.peak_bytes
    segment = measured.trace["segments"][0]
    assert sum(block["size"] for block in segment["blocks"]) == segment["total_size"]  # blocks tile it
    # what is alive at the end: parameters, their gradients and Adam's state, as allocated blocks
    live = sum(block["requested_size"] for block in segment["blocks"] if block["state"] == "active_allocated")
    assert live >= measured.params_bytes + measured.grads_bytes + measured.optimizer_bytes


@pytest.mark.slow  # three interpreters start torch
def test_pytorchs_viewer_opens_a_cli_trace(tmp_path: Path) -> None:
    path = tmp_path / "step.pickle"
    assert main(["measure", "--depth", "2", "--batch-size", "32", "--trace", str(path), "--json"]) == 0
    plot = viz("trace_plot", str(path), "-o", str(tmp_path / "step.html"))
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "step.html").stat().st_size > 1000
    stats = viz("stats", str(path))
    assert stats.returncode == 0 and "total_allocated" in stats.stdout, stats.stderr
    listing = viz("trace", str(path))
    assert listing.returncode == 0 and "entries" in listing.stdout


def test_a_trace_of_a_step_without_one_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["measure", "--mode", "inference", "--trace", str(tmp_path / "t.pickle")]) == 2
    err = capsys.readouterr().err
    assert "argument --trace: no trace of --mode inference" in err and "allowed: --mode train" in err
    assert not (tmp_path / "t.pickle").exists()


def test_frees_of_storages_made_before_the_trace_count_from_the_start() -> None:
    from bpmem.analytic.ledger import Ledger

    ledger = Ledger(allocations=[])
    ledger.alloc("w", 400, "params")
    ledger.alloc("a", 100, "forward")
    ledger.free("a")
    ledger.resize("g", 64, "gathered")  # FSDP's in-place growth: an alloc
    ledger.resize("g", 0, "gathered")  # and its shrink: a free
    snapshot = snapshot_from_allocations(ledger.allocations)
    actions = [event["action"] for event in snapshot["device_traces"][0]]
    assert actions == ["alloc", "alloc", "free_requested", "free_completed", "alloc", "free_requested",
                       "free_completed"]
    assert peak_of_trace(snapshot) == 500
    # a trace that starts after "w" was made sees only its free: still 400 B at the start
    later = {"device_traces": [[e for e in snapshot["device_traces"][0] if e["size"] != 400]
                               + [{"action": "free_completed", "addr": 1, "size": 400}]]}
    assert peak_of_trace(later) == 500


@pytest.mark.slow  # a small sweep
def test_the_sweep_writes_a_trace_per_measured_training_cell(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text('name = "t"\nbatch_sizes = [8]\nmodes = ["train", "inference"]\n'
                      'strategies = ["none", "checkpoint-sqrt"]\nrepeats = 1\nwarmup = 0\n[model]\ndepth = 2\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(out), "--trace", "--quiet", "--no-report"]) == 0
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    train = {row["cell_id"]: int(row["peak_bytes"]) for row in rows if row["mode"] == "train"}
    assert sorted(path.stem for path in (out / "traces").glob("*.pickle")) == sorted(train)
    for cell_id, peak in train.items():
        path = out / "traces" / f"{cell_id}.pickle"
        import pickle

        with path.open("rb") as handle:  # a file this test's bpmem run wrote
            assert peak_of_trace(pickle.load(handle)) == peak


def test_write_snapshot_leaves_no_partial_file(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path / "deep" / "s.pickle", {"segments": [], "device_traces": [[]]})
    assert path.exists() and not list(path.parent.glob("*.partial"))
