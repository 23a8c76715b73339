"""The numbers behind the report's plots, checked against the rows and timelines they come
from; and a contended cell that the report does not take for a cost."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

import bpmem.measurement.cell
from bpmem.cli import main
from bpmem.report.build import load, load_timeline
from bpmem.report.plot_data import (
    PHASE_WIDTHS,
    breakdown,
    pick_cell_where_strategies_differ,
    power_of_two_ticks,
    timeline_layout,
)

SMALL = ('name = "small"\nbatch_sizes = [16, 64]\nmodes = ["train", "inference"]\n'
         'strategies = ["none", "checkpoint-sqrt", { name = "microbatch", microbatches = 2 }]\n'
         'repeats = 3\nwarmup = 1\n[model]\ndepth = [1, 4]\nhidden_dim = 64\ninput_dim = 32\n')


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plots")
    (folder / "small.toml").write_text(SMALL)
    assert main(["run", "--config", str(folder / "small.toml"), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


@pytest.mark.slow  # a small sweep
def test_the_training_bar_is_the_rows_peak(small_run: Path) -> None:
    frame = load(small_run)
    data = breakdown(frame)
    assert data is not None and data.batches == [16, 64]
    plain = frame[(frame.strategy == "none") & (frame.model == data.cell.model)].set_index(["mode", "batch_size"])
    for index, batch in enumerate(data.batches):
        train_stack = sum(values[index] for values in data.train.values())
        inference_stack = sum(values[index] for values in data.inference.values())
        assert train_stack == data.train_peaks[index] == plain.peak_bytes[("train", batch)]
        assert inference_stack == plain.peak_bytes[("inference", batch)]
    # the training peak holds what inference never does: gradients made in backward
    assert "backward" in data.train and "backward" not in data.inference


@pytest.mark.slow  # a small sweep
def test_the_timelines_phase_boundaries_are_its_events(small_run: Path) -> None:
    timeline = load_timeline(small_run)
    assert timeline is not None and len(timeline)
    for _, group in timeline.groupby("cell_id"):
        phases = list(group.phase)
        layout = timeline_layout(phases)
        assert len(layout.x) == len(phases) and layout.x == sorted(layout.x)
        # each span holds the events of one run of a phase: its right edge is that run's last event
        runs, position = [], 0
        for phase, start, end in layout.spans:
            inside = [i for i, x in enumerate(layout.x) if start < x <= end + 1e-12]
            assert inside and inside[0] == position, (phase, start, end)
            assert math.isclose(layout.x[inside[-1]], end)
            named = {p for p in phases[inside[0]:inside[-1] + 1] if p != "outside"}
            assert named <= {phase}
            runs.append(phase)
            position = inside[-1] + 1
        assert position == len(phases)
        # forward, backward and the optimizer each take their fixed share, however many runs
        total = {p: sum(end - start for q, start, end in layout.spans if q == p) for p in PHASE_WIDTHS}
        assert all(math.isclose(total[p], PHASE_WIDTHS[p]) for p in ("forward", "backward", "optimizer_step"))
        assert runs[0] == "zero_grad" and runs[-1] == "optimizer_step"


@pytest.mark.slow  # a small sweep
def test_the_compared_cell_is_where_strategies_differ_most(small_run: Path) -> None:
    frame = load(small_run)
    cell = pick_cell_where_strategies_differ(frame)
    assert cell is not None
    train = frame[(frame["mode"] == "train") & (frame.status == "ok")]
    spreads = {}
    for (model, batch), group in train.groupby(["model", "batch_size"]):
        per = group.groupby("label").saved_activation_bytes.max().astype(float)
        spreads[(model, batch)] = per.max() / per.min()
    assert (cell.model, cell.batch_size) == max(spreads, key=lambda key: (spreads[key], key[1]))
    assert f"B={cell.batch_size}" in cell.title() and "differ most" in cell.title()


def test_a_timeline_with_micro_batches_shares_forward_and_backward() -> None:
    phases = ["outside", "zero_grad", "forward", "forward", "outside", "backward", "forward", "backward",
              "backward", "optimizer_step"]
    layout = timeline_layout(phases)
    assert [p for p, _, _ in layout.spans] == ["zero_grad", "forward", "backward", "forward", "backward",
                                              "optimizer_step"]
    assert [round(end - start, 6) for _, start, end in layout.spans] == [0.25, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert layout.x[1] == 0.25 and layout.x[4] == 0.75  # the "outside" free joins the forward before it


@pytest.mark.parametrize(("low", "high"), [(0, 27 * 2**20), (0, 5000), (3 * 2**30, 9 * 2**30), (0, 1.0)])
def test_byte_ticks_are_multiples_of_a_power_of_two(low: float, high: float) -> None:
    ticks = power_of_two_ticks(low, high)
    assert 2 <= len(ticks) <= 12 or high - low < 2
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    assert math.log2(step).is_integer() and all((t / step).is_integer() for t in ticks)


@pytest.mark.slow  # a small sweep
def test_a_cell_that_waits_is_contended_and_its_overhead_is_not_reported(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint-sqrt's timed steps each sleep 50 ms first: a step that waits without
    computing, as one does while another process holds the cores. Its CPU time is then far
    below its wall time, its row is time_contended, and the report's summary says
    "contended" instead of an overhead (the plain twin's pairs do not sleep, so a bare ratio
    would read as a large cost)."""
    real_runner = bpmem.measurement.cell._step_runner

    def step_runner(spec, step, device, seed):
        run = real_runner(spec, step, device, seed)
        if step.strategy.name != "checkpoint-sqrt":
            return run

        def waiting_run() -> None:
            time.sleep(0.05)
            run()

        return waiting_run

    monkeypatch.setattr(bpmem.measurement.cell, "_step_runner", step_runner)
    config = tmp_path / "contended.toml"
    config.write_text('name = "contended"\nbatch_sizes = [8]\nstrategies = ["none", "checkpoint-sqrt"]\nrepeats = 3\n'
                      'warmup = 1\n[model]\ndepth = 4\nhidden_dim = 32\ninput_dim = 16\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    frame = load(out).set_index("strategy")
    assert bool(frame.time_contended["checkpoint-sqrt"]) is True
    assert frame.time_overhead["checkpoint-sqrt"] > 1  # the bare paired ratio: the sleep dwarfs the step
    summary = (out / "report.md").read_text().split("## Summary per strategy")[1].split("\n## ")[0]
    line = next(row for row in summary.splitlines() if row.startswith("| checkpoint-sqrt"))
    assert "contended" in line and "%" not in line.split("|")[4]
