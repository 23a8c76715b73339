"""Your own model under the split strategies: ``ddp`` and ``fsdp`` on any model, the pipelines
on an ``nn.Sequential``, over two gloo processes on the CPU through bpmem's launcher; what a
strategy cannot split is one line and exit 2, before any process starts."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bpmem.cli import main
from bpmem.measurement.cell import measure
from bpmem.models.user_model import TensorShape, UserModel
from bpmem.predict.estimate import estimate_ranks
from bpmem.strategies.registry import make_step
from bpmem.strategies.user_split import fsdp_units, owned_indices, skeleton
from bpmem.sweep.config import ConfigError, parse_config
from bpmem.sweep.launch import cell_from_json, cell_json, launch
from tests.toml_text import run_sweep

REPO_ROOT = Path(__file__).resolve().parent.parent
GPT = UserModel("bpmem.models.gpt:make_gpt", kwargs_json='{"layers": 2}', data="bpmem.models.gpt:make_batch",
                blocks_path="blocks")
# Linear(20, 16), Tanh, Linear(16, 5): an nn.Sequential of three children
SEQUENTIAL = UserModel("tests.fixtures.user_models:small_mlp", inputs=(TensorShape.parse("float32[B,20]", "--input"),),
                       target=TensorShape.parse("int64[B]<5", "--target"))
GPT_FLAGS = ["--model", GPT.factory, "--model-kwargs", GPT.kwargs_json, "--data", GPT.data, "--blocks", "blocks",
             "--batch-size", "4"]
CASES = [(GPT, make_step("ddp", batch_size=4, world_size=2, optimizer="adam")),
         (GPT, make_step("fsdp", batch_size=4, world_size=2, optimizer="adam")),
         (SEQUENTIAL, make_step("ddp", batch_size=8, world_size=2)),
         (SEQUENTIAL, make_step("fsdp", batch_size=8, world_size=2, optimizer="sgd-momentum")),
         (SEQUENTIAL, make_step("pipeline-gpipe", batch_size=8, world_size=2, microbatches=4)),
         (SEQUENTIAL, make_step("pipeline-1f1b", batch_size=8, world_size=2, microbatches=2, optimizer="adam"))]


def _case(row: dict) -> tuple[UserModel, object]:
    return CASES[row["cell_index"]]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every case in one torchrun job of two ranks, launched and judged as a sweep does."""
    log = tmp_path_factory.mktemp("user-split") / "cells.log"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(REPO_ROOT))  # the ranks import the test fixtures' models
        outcome = launch([cell_json(model, step) for model, step in CASES], 2, log, 300, repeats=1, warmup=0)
    assert outcome.rows is not None, outcome.error + "\n" + log.read_text()[-3000:]
    return outcome.rows


@pytest.mark.slow
def test_every_case_ran_on_both_ranks_with_one_devices_gradients(rows: list[dict]) -> None:
    """One row per (cell, rank); each rank's gradients equal one device's on the same global
    batch from the same seeded weights (float32 sums in another order)."""
    assert sorted((r["cell_index"], r["rank"]) for r in rows) == [(i, k) for i in range(len(CASES)) for k in (0, 1)]
    for row in rows:
        assert row["equivalence_max_rel_err"] < 1e-5, (_case(row)[1].strategy.name, row)


@pytest.mark.slow
def test_a_ddp_rank_holds_one_devices_step_at_its_rows_plus_the_buckets(rows: list[dict]) -> None:
    """A whole replica, the plain step's activations at B/2, and DDP's gradient buckets (a
    second copy of every gradient) on top of the plain peak: measured by the same probes."""
    for row in rows:
        model, step = _case(row)
        if step.strategy.name != "ddp":
            continue
        single = measure(model, make_step(batch_size=step.batch_size // 2, optimizer=step.optimizer))
        for figure in ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes"):
            assert row[figure] == getattr(single, figure), (model.factory, figure)
        assert row["peak_by_category"]["buckets"] == row["grads_bytes"]
        assert row["peak_bytes"] == single.peak_bytes + row["grads_bytes"]


@pytest.mark.slow
def test_fsdp_shards_every_block_and_keeps_ddps_activations(rows: list[dict]) -> None:
    """Every width of the GPT example is even, so a rank holds exactly half of DDP's replica;
    its all-gathered parameters are counted apart, and it retains what DDP retains."""
    by_case = {(row["cell_index"], row["rank"]): row for row in rows}
    for rank in (0, 1):
        ddp, fsdp = by_case[(0, rank)], by_case[(1, rank)]
        assert 2 * fsdp["params_bytes"] == ddp["params_bytes"] and 2 * fsdp["grads_bytes"] == ddp["grads_bytes"]
        assert fsdp["saved_activation_bytes"] == ddp["saved_activation_bytes"]
        assert 0 < fsdp["gathered_peak_bytes"] < ddp["params_bytes"]  # one unit whole at a time, never all


@pytest.mark.slow
def test_a_pipeline_rank_holds_its_slice_of_the_children(rows: list[dict]) -> None:
    """Three children over two stages: Linear(20, 16) and Tanh on rank 0, Linear(16, 5) on 1."""
    pipelines = [row for row in rows if _case(row)[1].strategy.name.startswith("pipeline")]
    assert len(pipelines) == 4
    for row in pipelines:
        assert row["params_bytes"] == 4 * ((20 * 16 + 16) if row["rank"] == 0 else (16 * 5 + 5))


@pytest.mark.slow
def test_your_own_models_fsdp_and_pipeline_peaks_are_predicted_by_a_dry_run_of_each_rank(rows: list[dict]) -> None:
    """No arithmetic of your model, yet each rank's peak: its share of the step run alone
    here, in a process group that does not communicate, equals what it measured under torchrun.

    Under gloo the backend's thread lets go of one unit's all-gather buffer a moment after the
    wait, before or after the next unit's is made: in one watched step, 11 of 40 GPT FSDP rank
    runs read 7,476,344 B against 7,208,056 B with Adam. The worker reports the least peak of
    5 steps, the dry run's early figure; the late one (``release_late``) is the only other
    figure the race can give, so either passes here; on the Sequential they are the same."""
    from bpmem.predict.rank_dry_run import rank_peaks

    checked = 0
    for index, (model, step) in enumerate(CASES):
        if step.strategy.peak_by_dry_run:
            measured = {r["rank"]: r["peak_bytes"] for r in rows if r["cell_index"] == index}
            early, late = rank_peaks(model, step), rank_peaks(model, step, release_late=True)
            for rank in (0, 1):
                assert measured[rank] in (early[rank], late[rank]), (step.strategy.name, rank, early, late)
            if model == SEQUENTIAL:
                assert early == late, step.strategy.name  # nothing to race on: one exact figure
            checked += 1
    assert checked == 4  # fsdp on the GPT and the Sequential, and two pipelines


@pytest.mark.slow
def test_the_gpt_fsdp_race_is_one_all_gather_buffer_and_the_late_release_shows_it() -> None:
    """The two figures differ on the GPT with Adam: when the buffers go late, the peak rises."""
    from bpmem.predict.rank_dry_run import rank_peaks

    model, step = CASES[1]
    early, late = rank_peaks(model, step), rank_peaks(model, step, release_late=True)
    assert all(a < b for a, b in zip(early, late, strict=True))


@pytest.mark.slow
def test_a_sweep_of_your_own_model_runs_ddp_one_row_per_rank(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    out = run_sweep(tmp_path, "split", 'name = "mine"\nbatch_sizes = [4]\nstrategies = ["ddp", { name = '
                    '"pipeline-gpipe", microbatches = 2 }]\nrepeats = 1\nwarmup = 0\n\n[model]\nfactory = '
                    '"tests.fixtures.user_models:small_mlp"\ninput = "float32[B,20]"\ntarget = "int64[B]<5"\n')
    got = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["strategy"], r["rank"], r["status"]) for r in got] == [
        ("ddp", "0", "ok"), ("ddp", "1", "ok"), ("pipeline-gpipe", "0", "ok"), ("pipeline-gpipe", "1", "ok")]
    for row in got:  # measured; no arithmetic of this model: DDP predicts nothing (left empty, not invented),
        # the pipeline each rank's peak by a dry run of that rank
        expected = row["peak_bytes"] if row["strategy"].startswith("pipeline") else ""
        assert int(row["peak_bytes"]) > 0 and row["predicted_peak_bytes"] == expected and row["model_kwargs"] == ""
        assert float(row["equivalence_max_rel_err"]) < 1e-5
    assert [float(r["bubble_fraction"]) for r in got] == [0.0, 0.0, 1 / 3, 1 / 3]  # (p - 1) / (m + p - 1)
    assert (out / "report.md").exists()
    capsys.readouterr()


# -- fast: what goes to the worker, and what is refused before any process starts ------------------

@pytest.mark.parametrize("model", [GPT, SEQUENTIAL], ids=["gpt", "shapes"])
def test_your_own_model_travels_to_the_worker_whole(model: UserModel) -> None:
    step = make_step("ddp", batch_size=4, world_size=2, optimizer="adam")
    assert cell_from_json(cell_json(model, step)) == (model, step)
    assert str(TensorShape.parse("int64[B, 7]<10", "--target")) == "int64[B,7]<10"


def test_fsdp_units_are_the_blocks_that_hold_parameters() -> None:
    gpt = skeleton(GPT)
    assert fsdp_units(GPT, gpt) == list(gpt.blocks)
    sequential = skeleton(SEQUENTIAL)
    assert fsdp_units(SEQUENTIAL, sequential) == [sequential[0], sequential[2]]  # not the Tanh
    without_blocks = UserModel("tests.fixtures.user_models:scalar_loss", data="tests.fixtures.user_models:two_inputs",
                               loss="none")
    assert fsdp_units(without_blocks, skeleton(without_blocks)) == []  # one unit: the root


def test_a_pipeline_rank_owns_its_childrens_parameters() -> None:
    assert owned_indices(SEQUENTIAL, [(0, 2)]) == [0, 1] and owned_indices(SEQUENTIAL, [(2, 3)]) == [2, 3]
    step = make_step("pipeline-gpipe", batch_size=8, world_size=2, microbatches=4)
    assert step.strategy.owned_parameters(SEQUENTIAL, 1) == [2, 3]


def test_your_own_models_ranks_have_no_predicted_bytes() -> None:
    """No arithmetic of the model: the bytes stay None; the bubble is the schedule's alone."""
    ranks = estimate_ranks(SEQUENTIAL, make_step("pipeline-1f1b", batch_size=8, world_size=2, microbatches=2))
    assert [r.to_dict() for r in ranks] == [{"bubble_fraction": 1 / 3}] * 2
    assert [r.to_dict() for r in estimate_ranks(GPT, make_step("fsdp", batch_size=4, world_size=2))] == [
        {"bubble_fraction": 0.0}] * 2


@pytest.mark.parametrize("argv,words", [
    (["--strategy", "pipeline-gpipe"], "argument --model: pipeline-gpipe needs an nn.Sequential model"),
    (["--strategy", "pipeline-interleaved"], "needs an nn.Sequential model"),
    (["--strategy", "tensor-parallel"], "argument --strategy: tensor-parallel splits the MLP only"),
    (["--strategy", "model-parallel"], "argument --strategy: model-parallel splits the MLP only"),
    (["--strategy", "ddp"], "bpmem run"),  # it can: measured one process per rank, not by this command
])
@pytest.mark.parametrize("command", ["estimate", "measure"])
def test_a_split_strategy_says_what_it_needs_in_one_line(command: str, argv: list[str], words: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert main([command, *GPT_FLAGS, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_a_pipeline_needs_as_many_children_as_stages(capsys: pytest.CaptureFixture) -> None:
    flags = ["--model", SEQUENTIAL.factory, "--input", "float32[B,20]", "--target", "int64[B]<5"]
    assert main(["estimate", *flags, "--strategy", "pipeline-interleaved", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has 3 children, fewer than the 4 stages" in err, err


@pytest.mark.parametrize("factory,strategy,words", [
    ("bpmem.models.gpt:make_gpt", "tensor-parallel", "tensor-parallel splits the MLP only"),
    ("bpmem.models.gpt:make_gpt", "pipeline-1f1b", "pipeline-1f1b needs an nn.Sequential model"),
])
def test_a_sweep_refuses_what_cannot_split_your_model(factory: str, strategy: str, words: str) -> None:
    table = {"factory": factory, "data": "bpmem.models.gpt:make_batch", "kwargs": {"layers": 2}}
    with pytest.raises(ConfigError, match=words) as caught:
        parse_config({"strategies": [strategy], "model": table})
    assert caught.value.key == "strategies" and "allowed with factory: " in str(caught.value)
    assert parse_config({"strategies": ["ddp", "fsdp"], "model": table}).cells()  # these split any model
