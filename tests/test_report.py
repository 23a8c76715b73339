"""Reports: every number in report.md comes from results.csv; plots are drawn even when
rows failed; the graph's saved bytes are the estimate's."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pandas as pd
import pytest

from bpmem.cli import main
from bpmem.predict.estimate import estimate
from bpmem.report.build import report
from bpmem.report.graph import graph_svg
from bpmem.spec import MLPSpec
from bpmem.strategies.registry import make_step
from bpmem.units import format_bytes
from tests.toml_text import run_sweep

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("report")
    for name in ("results.csv", "timelines.csv"):
        shutil.copy(FIXTURES / name, folder / name)
    path = report(folder)
    return folder, path.read_text(), pd.read_csv(folder / "results.csv")


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_every_plot_exists_as_png_and_svg_and_is_linked_relatively(rendered) -> None:
    folder, text, _ = rendered
    for name in ("memory_vs_batch", "breakdown", "checkpoint_pareto", "split_memory", "pareto_all", "timeline",
                 "predicted_vs_measured"):
        assert (folder / "plots" / f"{name}.png").stat().st_size > 5000
        assert (folder / "plots" / f"{name}.svg").exists()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all(not link.startswith("/") and (folder / link).exists() for link in links)
    assert "[results.csv](results.csv)" in text


def test_the_worked_example_numbers_are_the_csv_numbers(rendered) -> None:
    _, text, frame = rendered
    seed = frame[(frame.strategy == "none") & (frame["mode"] == "train") & (frame.depth == 1)
                 & (frame.batch_size == 64)].iloc[0]
    inference = frame[(frame.strategy == "none") & (frame["mode"] == "inference") & (frame.depth == 1)
                      & (frame.batch_size == 64)].iloc[0]
    section = text.split("## The seed's worked example")[1].split("## ")[0]
    for column in ("params_bytes", "grads_bytes", "saved_activation_bytes", "peak_bytes"):
        value = int(seed[column])
        assert f"{value:,} B ({format_bytes(value)})" in section, column
    assert f"{int(inference.peak_bytes):,} B" in section
    assert f"**{seed.peak_bytes / inference.peak_bytes:.2f}x**" in section


def test_the_hvp_answer_uses_the_hvp_row(rendered) -> None:
    _, text, frame = rendered
    hvp = frame[(frame["mode"] == "hvp") & (frame.depth == 1) & (frame.batch_size == 64)].iloc[0]
    assert f"{int(hvp.saved_activation_bytes):,} B" in text.split("**4. Second derivatives.**")[1]


def test_failed_rows_are_listed_and_plots_still_drawn(rendered) -> None:
    folder, text, frame = rendered
    status = text.split("## Status")[1].split("## ")[0]
    for row in frame[frame.status != "ok"].itertuples():
        assert row.cell_id in status and row.status in status
    assert "18 ok" in status and "1 oom" in status and "1 error" in status


def test_summary_ratio_is_computed_from_the_rows(rendered) -> None:
    _, text, frame = rendered
    train = frame[(frame["mode"] == "train") & (frame.status == "ok")]
    plain = train[(train.strategy == "none") & (train.depth == 3) & (train.batch_size == 4)].iloc[0]
    sqrt = train[(train.strategy == "checkpoint-sqrt") & (train.depth == 3) & (train.batch_size == 4)].iloc[0]
    ratio = plain.saved_activation_bytes / sqrt.saved_activation_bytes
    summary = text.split("## Summary per strategy")[1].split("## ")[0]
    assert f"{ratio:.2f}" in summary


def test_a_file_written_before_pairing_states_no_overhead(rendered) -> None:
    """The fixture predates paired timing (no time_overhead, no interval, no CPU time): it still
    reports, and its strategies' time is "not paired", never a ratio of two cells' medians."""
    _, text, frame = rendered
    assert "time_overhead" not in frame and "step_cpu_time_median_s" not in frame
    summary = text.split("## Summary per strategy")[1].split("\n## ")[0]
    lines = [row for row in summary.splitlines() if row.startswith("| ") and row.split("|")[1].strip() not in
             ("strategy", "---")]
    assert len(lines) == 3
    for line in lines:
        time_cell = line.split("|")[4]
        assert "%" not in time_cell
        assert "(the reference)" in time_cell if line.startswith("| none ") else "not paired" in time_cell
    assert "not timed in pairs" in text.split("**5. Too big for one GPU.**")[1]


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_report_command_and_missing_csv(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "results.csv" in capsys.readouterr().err
    shutil.copy(FIXTURES / "results.csv", tmp_path / "results.csv")
    assert main(["report", str(tmp_path)]) == 0  # no timelines.csv: the timeline plot is empty, not an error
    assert (tmp_path / "report.md").exists() and (tmp_path / "plots" / "timeline.png").exists()


@pytest.mark.parametrize("bias,activation", [(False, "relu"), (True, "gelu")])
def test_graph_labels_saved_tensors_with_the_estimates_bytes(bias: bool, activation: str) -> None:
    spec = MLPSpec(bias=bias, activation=activation, depth=2)
    svg = graph_svg(spec, make_step(batch_size=64))
    ElementTree.fromstring(svg)  # well-formed XML
    total = estimate(spec, make_step(batch_size=64)).saved_activation_bytes
    assert f"{total:,} B in all" in svg
    assert ("b1" in svg) is bias
    assert f"kept {format_bytes(64 * 784 * 4)}" in svg  # X


@pytest.mark.slow  # a whole sweep
def test_a_model_parallel_run_on_one_cpu_is_reported(tmp_path: Path) -> None:
    """model-parallel on the CPU puts both stages on the one device: the device's peak is on
    the first stage's row, and the second stage's row has none. That is a complete row, not
    a malformed one (the report used to refuse the file)."""
    out = run_sweep(tmp_path, "mp", 'name = "mp"\nbatch_sizes = [4]\nrepeats = 1\nwarmup = 0\n'
                    'strategies = [{ name = "model-parallel", world_size = 2 }]\n[model]\ndepth = 3\nhidden_dim = 16\n')
    rows = pd.read_csv(out / "results.csv")
    assert list(rows.status) == ["ok", "ok"] and rows.peak_bytes.isna().tolist() == [False, True]
    assert (out / "report.md").exists()
    assert main(["report", str(out)]) == 0


def test_graph_draws_the_strategys_segments_and_folds_deep_models() -> None:
    """checkpoint-sqrt at depth 64: one shaded stretch per row a segment spans, its inner
    tensors recomputed, only segment inputs kept; 65 layers fold into 17 rows of 4."""
    spec, step = MLPSpec(depth=64), make_step("checkpoint-sqrt", batch_size=64)
    svg = graph_svg(spec, step)
    root = ElementTree.fromstring(svg)
    width, height = float(root.get("width")), float(root.get("height"))
    assert width < 2000 and height > 16 * 150  # rows, not one 18,000 px line
    plan = step.strategy.plan(spec, 64)
    checkpointed = [s for s in plan if s.checkpointed]
    labels = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {f"segment {k}: recomputed in backward" for k in range(1, len(checkpointed) + 1)} <= set(labels)
    kept_h = {label for label in labels if label and label.startswith("kept ")}
    assert kept_h  # segment inputs
    recomputed = labels.count("recomputed")
    inner = sum(2 * (s.end - s.start) - 1 for s in checkpointed)  # each unit's z and h, but the last h
    assert recomputed == inner
    # every note fits its box (about 20 characters at 9 px in 112 px)
    notes = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.get("font-size") == "9"]
    assert max(len(n) for n in notes if not n.startswith("segment")) <= 20
    total = estimate(spec, step).saved_activation_bytes
    assert f"{total:,} B in all" in svg


def test_graph_of_hvp_shows_the_backward_graph_it_keeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["graph", "--mode", "hvp", "--depth", "2"]) == 0
    path = tmp_path / "reports" / "graphs" / "mlp-d2-h256-relu-hvp-none-B64.svg"
    assert path.exists() and not (tmp_path / "graph.svg").exists()
    svg = path.read_text()
    assert "create_graph=True" in svg and "dJ/dz1" in svg and "dJ/do" in svg
    assert main(["graph", "--strategy", "ddp", "--world-size", "2"]) == 2
    assert "argument --strategy" in capsys.readouterr().err
