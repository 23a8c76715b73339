"""Splitting over two gloo processes on the CPU: every distributed strategy (pipelines, DDP,
FSDP2, tensor parallelism), equivalence with the single-device step, per-rank bytes against
the prediction, and a rank that dies mid-step."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bpmem.analytic.schedules import interleaved_order, interleaved_rounds
from bpmem.predict.estimate import estimate_ranks
from bpmem.spec import MLPSpec, StepSpec
from bpmem.strategies import registry
from bpmem.strategies.base import RANKS
from bpmem.strategies.fsdp import fsdp_shard_rows
from bpmem.strategies.registry import make_step
from bpmem.strategies.tensor_parallel import tensor_parallel_styles
from bpmem.sweep.config import Cell, SweepConfig
from bpmem.sweep.environment import environment
from bpmem.sweep.launch import complete_rows
from bpmem.sweep.split import run_distributed_cell
from bpmem.sweep.teardown import done_marker

pytestmark = pytest.mark.slow  # torchrun jobs: one process per rank

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC = MLPSpec(input_dim=32, hidden_dim=16, output_dim=4, depth=5)
def _two_ranks(strategy: str, batch_size: int = 16) -> StepSpec:
    """Two ranks of ``strategy``; a pipeline's batch in 4 micro-batches."""
    micro = {"microbatches": 4} if "microbatches" in registry.parameters(strategy) else {}
    return make_step(batch_size=batch_size, strategy=strategy, world_size=2, **micro)


STEPS = [_two_ranks(name) for name in registry.names(RANKS)]


def predict_rank(spec: MLPSpec, step: StepSpec, rank: int, world_size: int) -> dict:
    """One rank's predicted figures, as a dict (world_size is the step's own)."""
    assert step.world_size == world_size
    return estimate_ranks(spec, step)[rank].to_dict(drop_none=False)


def check(spec: MLPSpec, step: StepSpec, world_size: int) -> None:
    assert step.world_size == world_size
    step.strategy.check(spec, step)
MSE_GELU = MLPSpec(input_dim=20, hidden_dim=12, output_dim=6, depth=4, activation="gelu", loss="mse", bias=True)
DEEP = MLPSpec(input_dim=64, hidden_dim=64, output_dim=10, depth=16)
DEEP_1F1B = make_step(batch_size=64, strategy="pipeline-1f1b", microbatches=4, world_size=2)
# odd widths: FSDP2 pads dim 0 to ceil(n / 2) rows (13 -> 7 + 6, 5 -> 3 + 2)
UNEVEN = MLPSpec(input_dim=21, hidden_dim=13, output_dim=5, depth=2, bias=True, activation="tanh")
EXTRA = [(MSE_GELU, make_step(batch_size=8, strategy="pipeline-1f1b", microbatches=2, world_size=2, optimizer="adam")),
         (MSE_GELU, make_step(batch_size=8, strategy="pipeline-gpipe", microbatches=2, world_size=2)),
         (MSE_GELU, make_step(batch_size=8, strategy="fsdp", world_size=2, optimizer="adam")),
         # 5 Linears: two colwise/rowwise pairs, the output layer replicated
         (MSE_GELU, make_step(batch_size=8, strategy="tensor-parallel", world_size=2, optimizer="adam")),
         (UNEVEN, make_step(batch_size=6, strategy="fsdp", world_size=2, optimizer="sgd-momentum")),
         # the interleaved schedule at more micro-batches: rounds of 2, sends held to the end
         (SPEC, make_step(batch_size=24, strategy="pipeline-interleaved", microbatches=6, world_size=2)),
         (MSE_GELU, make_step(batch_size=8, strategy="pipeline-interleaved", microbatches=4, world_size=2)),
         (DEEP, DEEP_1F1B)]  # last: the depth-16 test finds it there


def _torchrun(cells: list[tuple[MLPSpec, StepSpec]], out: Path, env: dict[str, str] | None = None, ranks: int = 2):
    cell_json = json.dumps([{"spec": spec.__dict__, "step": registry.flat_step(step)} for spec, step in cells])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "bpmem.worker", "--cell", cell_json, "--out", str(out), "--repeats", "1", "--warmup", "0",
               "--timeout-s", "60"]
    environ = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=180)


def _recorded(done: subprocess.CompletedProcess, out: Path, cells: int, ranks: int = 2) -> list[dict]:
    """The rows of a finished job, judged as the sweep judges it: complete rows from rank 0
    and every rank's done marker, whatever the exit codes. Fails with the whole output."""
    rows = complete_rows(out, ranks, cells)
    assert rows is not None, done.stdout + done.stderr
    return rows


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One torchrun job, both ranks, every strategy in turn (one process start for all)."""
    out = tmp_path_factory.mktemp("dist") / "rows.json"
    done = _torchrun([(SPEC, step) for step in STEPS] + EXTRA, out)
    return _recorded(done, out, len(_cases()))


def _cases() -> list[tuple[MLPSpec, StepSpec]]:
    return [(SPEC, step) for step in STEPS] + EXTRA


def test_every_strategy_ran_on_both_ranks(rows: list[dict]) -> None:
    assert sorted((r["cell_index"], r["rank"]) for r in rows) == [(i, k) for i in range(len(_cases())) for k in (0, 1)]


def test_gradients_equal_the_single_device_step(rows: list[dict]) -> None:
    """Same global batch, same initial weights: float32 sums in another order, so 1e-5."""
    for row in rows:
        assert row["equivalence_max_rel_err"] < 1e-5, row


def test_each_rank_holds_what_was_predicted(rows: list[dict]) -> None:
    """Parameters, gradients, optimizer state and retained activations per rank, exactly, for
    every strategy (FSDP and tensor parallel: the local shards of the DTensors; the
    interleaved schedule: its order of forwards and backwards replayed)."""
    for row in rows:
        spec, step = _cases()[row["cell_index"]]
        predicted = predict_rank(spec, step, row["rank"], 2)
        for figure in ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes"):
            assert row[figure] == predicted[figure], (step.strategy.name, row["rank"], figure)


def _row(rows: list[dict], spec: MLPSpec, strategy: str, rank: int) -> dict:
    index = next(i for i, (a, b) in enumerate(_cases()) if a == spec and b.strategy.name == strategy)
    return next(r for r in rows if r["cell_index"] == index and r["rank"] == rank)


def test_fsdp_and_tensor_parallel_split_the_parameters(rows: list[dict]) -> None:
    """On SPEC (even widths) each rank of FSDP and of tensor parallel holds half of DDP's
    replica, gradients included; FSDP retains what DDP does (the same B/2 rows), tensor
    parallel more (the whole batch) but less than one device at B (half features between
    each colwise/rowwise pair)."""
    from bpmem.predict.estimate import estimate

    single = estimate(SPEC, make_step(batch_size=16)).saved_activation_bytes
    for rank in (0, 1):
        ddp, fsdp, tp = (_row(rows, SPEC, name, rank) for name in ("ddp", "fsdp", "tensor-parallel"))
        for figure in ("params_bytes", "grads_bytes"):
            assert 2 * fsdp[figure] == 2 * tp[figure] == ddp[figure], figure
        assert fsdp["saved_activation_bytes"] == ddp["saved_activation_bytes"]
        assert ddp["saved_activation_bytes"] < tp["saved_activation_bytes"] < single


def test_fsdp_pads_uneven_shards() -> None:
    """13 rows over 2 ranks: 7 and 6, both padded to 7; 1 row over 2: rank 1 holds none."""
    assert [fsdp_shard_rows(13, r, 2) for r in (0, 1)] == [(7, 7), (6, 7)]
    assert [fsdp_shard_rows(1, r, 2) for r in (0, 1)] == [(1, 1), (0, 1)]
    params = [predict_rank(UNEVEN, make_step(batch_size=6, strategy="fsdp", world_size=2), r, 2)["params_bytes"]
              for r in (0, 1)]
    assert params[0] == params[1] == 4 * (7 * 21 + 7 + 7 * 13 + 7 + 3 * 13 + 3)


def test_tensor_parallel_pairs_linears_and_needs_an_even_hidden_width() -> None:
    assert tensor_parallel_styles(SPEC) == ["colwise", "rowwise"] * 3
    assert tensor_parallel_styles(MSE_GELU) == ["colwise", "rowwise"] * 2 + ["replicated"]
    with pytest.raises(ValueError, match="hidden_dim: 13"):
        check(UNEVEN, make_step(batch_size=6, strategy="tensor-parallel", world_size=2), 2)
    check(UNEVEN, make_step(batch_size=6, strategy="fsdp", world_size=2), 2)  # FSDP pads instead


def test_pipelines_keep_more_than_the_textbook_says(rows: list[dict]) -> None:
    """1F1B's textbook keeps p - r micro-batches on stage r; PipelineStage also keeps every
    receive buffer and the schedule an extra output: measured above textbook, as predicted."""
    one_f_one_b = [r for r in rows if _cases()[r["cell_index"]][1].strategy.name == "pipeline-1f1b"
                   and _cases()[r["cell_index"]][0] == SPEC]
    for row in one_f_one_b:
        textbook = predict_rank(SPEC, STEPS[1], row["rank"], 2)["textbook_saved_bytes"]
        assert row["saved_activation_bytes"] > textbook


def test_1f1b_on_two_ranks_keeps_at_most_60_percent_per_rank_at_depth_16(rows: list[dict]) -> None:
    from bpmem.predict.estimate import estimate

    single = estimate(DEEP, make_step(batch_size=64)).saved_activation_bytes  # exact, tested elsewhere
    deep = [r for r in rows if r["cell_index"] == len(_cases()) - 1]
    assert len(deep) == 2
    for row in deep:
        assert row["saved_activation_bytes"] <= 0.6 * single, (row["rank"], row["saved_activation_bytes"], single)


def test_every_strategy_releases_its_distributed_objects_before_the_final_barrier(
        rows: list[dict], tmp_path_factory: pytest.TempPathFactory) -> None:
    """DDP reducers, FSDP modules, pipeline stages and schedules, DTensors: none is alive on
    either rank when the process group goes (the cause of the SIGABRT at exit)."""
    out = next(tmp_path_factory.getbasetemp().glob("dist*/rows.json"))
    for rank in (0, 1):
        assert json.loads(done_marker(out, rank).read_text()) == {"rank": rank, "leftover": []}


def _fault_cell(monkeypatch: pytest.MonkeyPatch, fault: str, tmp_path: Path, strategy: str = "pipeline-gpipe",
                timeout_s: int = 120) -> tuple[list[dict], str]:
    """Run one cell with an injected fault; afterwards, no process that this cell's job
    started (torchrun and its ranks, tracked by pid as the launcher ends them) is left."""
    import psutil

    import bpmem.sweep.launch

    monkeypatch.setenv("BPMEM_FAULT", fault)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    started: list[psutil.Process] = []
    real_kill = bpmem.sweep.launch.kill_job

    def tracked_kill(process: subprocess.Popen) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            job = psutil.Process(process.pid)
            started.extend([job, *job.children(recursive=True)])
        real_kill(process)

    monkeypatch.setattr(bpmem.sweep.launch, "kill_job", tracked_kill)
    config = SweepConfig(repeats=1, warmup=0, timeout_s=timeout_s)
    cell = Cell(SPEC, _two_ranks(strategy), "cpu")
    result = run_distributed_cell(cell, "test", environment("cpu"), config, tmp_path / "logs")
    alive = [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"left running: {alive}"
    return result, (tmp_path / "logs" / f"{cell.cell_id}.log").read_text()


def test_an_abort_after_the_work_is_recorded_keeps_the_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The rank aborts in teardown as torch once did (SIGABRT, exit -6): the cell stays ok."""
    result, log = _fault_cell(monkeypatch, "abort-at-exit:1", tmp_path, strategy="ddp")
    assert [r["status"] for r in result] == ["ok", "ok"], result[0]["error"]
    assert all(r["peak_bytes"] > 0 for r in result)
    assert "[default1]:terminate called without an active exception" in log
    assert "every rank recorded its work" in log.splitlines()[-1]


def test_a_rank_that_hangs_after_recording_is_not_waited_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result, log = _fault_cell(monkeypatch, "hang-at-exit:0", tmp_path, strategy="fsdp", timeout_s=100)
    assert [r["status"] for r in result] == ["ok", "ok"]
    assert "every rank recorded its work" in log


def test_a_rank_that_raises_gives_its_exception_as_the_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result, log = _fault_cell(monkeypatch, "raise:1", tmp_path)
    assert [r["status"] for r in result] == ["error", "error"]
    assert result[0]["error"] == "rank 1: RuntimeError: injected fault (BPMEM_FAULT)"
    assert "Traceback" in log and "[default1]:" in log  # the whole output, every rank's lines


def test_a_killed_rank_is_an_error_row_and_leaves_no_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result, log = _fault_cell(monkeypatch, "kill:1", tmp_path)
    assert [r["status"] for r in result] == ["error", "error"]
    assert result[0]["error"] == "rank 1 died: exit code -9 (SIGKILL)"
    assert "Root Cause" in log and log.rstrip().endswith(result[0]["error"])


def test_a_hung_rank_times_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result, log = _fault_cell(monkeypatch, "hang:0", tmp_path, strategy="ddp", timeout_s=15)
    assert [r["error"] for r in result] == ["timed out after 15 s (a rank hung); the job was killed"] * 2


@pytest.mark.parametrize("world,microbatches", [(2, 2), (2, 4), (2, 6), (3, 3), (3, 9), (4, 8)])
def test_interleaved_order_runs_every_micro_batch_forward_then_backward(world: int, microbatches: int) -> None:
    """Each local stage sees m forwards and m backwards, a micro-batch's backward never before
    its forward, and the last rank's first backward comes after one round of warm-up
    forwards and the first steady-state forward."""
    for rank in range(world):
        order = interleaved_order(rank, world, microbatches)
        for stage in (rank, rank + world):
            actions = [a for a, s in order if s == stage]
            assert actions.count("F") == actions.count("B") == microbatches
            in_flight = 0
            for action in actions:
                in_flight += 1 if action == "F" else -1
                assert in_flight >= 0
    last = interleaved_order(world - 1, world, microbatches)
    assert last.index(("B", 2 * world - 1)) == interleaved_rounds(microbatches, world)[1] + 1


def test_interleaved_needs_whole_rounds() -> None:
    step = make_step(batch_size=20, strategy="pipeline-interleaved", microbatches=5, world_size=2)
    with pytest.raises(ValueError, match="microbatches: 5 does not split into 2 equal rounds"):
        check(SPEC, step, 2)


def test_three_ranks_keep_what_was_predicted(tmp_path: Path) -> None:
    """Three ranks: the interleaved schedule's replay (6 stages) and 1F1B, where stage r keeps
    p - r micro-batches and, with GELU, no extra output for its send (GELU saves its input)."""
    gelu = MLPSpec(input_dim=20, hidden_dim=12, output_dim=6, depth=6, activation="gelu", loss="mse", bias=True)
    relu = MLPSpec(input_dim=32, hidden_dim=16, output_dim=4, depth=7)
    cells = [(relu, make_step(batch_size=36, strategy="pipeline-interleaved", microbatches=6, world_size=3)),
             (gelu, make_step(batch_size=36, strategy="pipeline-interleaved", microbatches=3, world_size=3)),
             (gelu, make_step(batch_size=36, strategy="pipeline-1f1b", microbatches=6, world_size=3))]
    out = tmp_path / "rows.json"
    done = _torchrun(cells, out, ranks=3)
    rows = _recorded(done, out, len(cells), ranks=3)
    assert len(rows) == 9
    for rank in range(3):  # nothing distributed outlived the cells, on any rank
        assert json.loads(done_marker(out, rank).read_text())["leftover"] == []
    for row in rows:
        spec, step = cells[row["cell_index"]]
        predicted = predict_rank(spec, step, row["rank"], 3)
        assert row["saved_activation_bytes"] == predicted["saved_activation_bytes"], (step.strategy.name, row["rank"])
        assert row["equivalence_max_rel_err"] < 1e-5


def test_ddp_peak_is_the_local_step_plus_the_buckets(rows: list[dict]) -> None:
    """DDP reports its buckets (one copy of every gradient); the peak is the plain step's at
    B/p plus them, to the byte where the peak falls in backward (as here: both ranks). Where it
    falls in the optimizer step, the rank also holds the 4 B scalar per parameter that DDP's
    backward made and no longer J (4 B): off by exactly that (bpmem.strategies.ddp)."""
    exact = 0
    for row in rows:
        spec, step = _cases()[row["cell_index"]]
        if step.strategy.name != "ddp":
            continue
        predicted = predict_rank(spec, step, row["rank"], 2)
        assert row["peak_by_category"]["buckets"] == predicted["buffer_bytes"] == row["grads_bytes"]
        n_params = len(step.strategy.owned_parameters(spec, row["rank"]))
        off = 0 if row["peak_phase"] == "backward" else 4 * n_params - 4
        assert row["peak_bytes"] - predicted["peak_bytes"] == off, (row["peak_phase"], row["peak_bytes"], predicted)
        exact += off == 0
    assert exact == 2  # the exact case was the one held


def test_fsdp_gathers_one_unit_at_a_time(rows: list[dict]) -> None:
    """The all-gathered parameters (storages FSDP2 resizes in place) are counted in the peak,
    and at most the largest Linear is whole at any moment."""
    fsdp = [row for row in rows if _cases()[row["cell_index"]][1].strategy.name == "fsdp"]
    assert fsdp
    for row in fsdp:
        spec, step = _cases()[row["cell_index"]]
        assert row["gathered_peak_bytes"] == predict_rank(spec, step, row["rank"], 2)["gathered_bytes"]
        assert row["peak_bytes"] >= row["params_bytes"] + row["gathered_peak_bytes"]


def test_fsdp_tensor_parallel_and_pipeline_peaks_are_predicted_by_a_dry_run_of_each_rank(rows: list[dict]) -> None:
    """Each rank's step run alone in this process, with a process group that does not
    communicate (bpmem.predict.rank_dry_run), peaks at exactly what that rank measured under torchrun:
    the all-gathers, reduce-scatters and redistributions allocate the same buffers in the
    same order, and a pipeline stage told its shapes up front receives into the same buffers
    as one that learned them from its neighbour."""
    from bpmem.predict.rank_dry_run import rank_peaks

    checked = 0
    for index, (spec, step) in enumerate(_cases()):
        if not step.strategy.peak_by_dry_run:
            continue
        if spec == UNEVEN:  # FSDP pads uneven shards by sizes the ranks exchange: a fake group has none
            with pytest.raises(ValueError, match=r"strategy: the dry run of rank \d needs data a real collective"):
                rank_peaks(spec, step)
            continue
        measured = {r["rank"]: r["peak_bytes"] for r in rows if r["cell_index"] == index}
        assert rank_peaks(spec, step) == [measured[0], measured[1]], step.strategy.name
        if step.strategy.name in ("fsdp", "tensor-parallel"):  # gloo's release of buffers cannot move the peak
            assert rank_peaks(spec, step, release_late=True) == [measured[0], measured[1]], step.strategy.name
        checked += 1
    # FSDP and tensor parallel on two models each; every pipeline schedule on two models
    assert checked >= 4 + 3 * 2
