"""The sweep's split cells: one row per rank or stage, each with its own predictions.

A cell's ``Placement`` (``bpmem.strategies.placement.place``) says where every rank or stage runs; it
is decided before anything is launched, so a cell this machine cannot hold becomes
``skipped`` rows that say why, and the rows record the device each rank really ran on.

- ``run_distributed_cell``: ``torchrun -m bpmem.worker``, one process per rank (DDP, FSDP,
  tensor-parallel, pipelines); the worker places its rank with the same function.
- ``run_model_parallel_cell``: ``model-parallel``, every stage in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from bpmem.figures import MEASURED_RANK_COLUMNS, RankFigures
from bpmem.measurement.cell import is_out_of_memory
from bpmem.strategies.placement import Placement
from bpmem.sweep.cell import base_row, one_line, release_memory
from bpmem.sweep.config import Cell, SweepConfig


def rank_rows(cell: Cell, run_id: str, env: dict[str, Any], config: SweepConfig,
              predictions: list[RankFigures], error: BaseException | None = None) -> list[dict[str, Any]]:
    """One row per rank (device) of a split cell, with that rank's predictions; with
    ``error``, every row is an ``error`` row carrying its message."""
    rows = []
    for rank in range(cell.step.world_size):
        row = base_row(cell, run_id, env, config, distributed=True)
        row["rank"], row["world_size"] = rank, cell.step.world_size
        if error is not None:
            row.update(status="error", error=one_line(error))
        else:
            predicted = predictions[rank]
            row.update({f"predicted_{k}": getattr(predicted, k)
                        for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes")})
            row.update(bubble_fraction=predicted.bubble_fraction, predicted_comm_bytes=predicted.comm_bytes,
                       textbook_saved_activation_bytes=predicted.textbook_saved_bytes,
                       predicted_peak_bytes=predicted.peak_bytes)
        rows.append(row)
    return rows


def skipped_rows(cell: Cell, run_id: str, env: dict[str, Any], config: SweepConfig,
                 why: str) -> list[dict[str, Any]]:
    """The rows of a cell that does not run here: one per rank (or one, for a single-device
    cell), ``skipped``, with the reason."""
    distributed = cell.step.world_size > 1 and cell.step.strategy.placement != "one-device"
    rows = []
    for rank in range(cell.step.world_size if distributed else 1):
        row = base_row(cell, run_id, env, config, distributed=distributed)
        if distributed:
            row["rank"], row["world_size"] = rank, cell.step.world_size
        row.update(status="skipped", error=why)
        rows.append(row)
    return rows


def run_model_parallel_cell(cell: Cell, run_id: str, env: dict[str, Any], config: SweepConfig,
                            placement: Placement | None = None) -> list[dict[str, Any]]:
    """Measure a ``model-parallel`` cell in this process: one row per stage (device)."""
    from bpmem.strategies.model_parallel_runtime import stage_devices

    strategy = cell.step.strategy
    try:
        strategy.check(cell.spec, cell.step)
        devices = stage_devices(cell.device, cell.step.world_size, placement)
        predictions = strategy.predict_stages(cell.spec, cell.step, separate_devices=len(set(devices)) > 1)
    except ValueError as error:
        return rank_rows(cell, run_id, env, config, [], error)
    rows = rank_rows(cell, run_id, env, config, predictions)
    try:
        measured = strategy.measure_stages(cell.spec, cell.step, cell.device, config.warmup, config.repeats,
                                           placement)
    except Exception as error:  # noqa: BLE001 - every failure becomes a row, the sweep goes on
        for row in rows:
            row.update(status="oom" if is_out_of_memory(error) else "error", error=one_line(error))
        release_memory(cell.device)
        return rows
    for row, got in zip(rows, measured, strict=True):
        row.update({k: getattr(got, k) for k in MEASURED_RANK_COLUMNS}, device=got.device, status="ok", error="")
    return rows


def run_distributed_cell(cell: Cell, run_id: str, env: dict[str, Any], config: SweepConfig,
                         log_dir: Path | None = None) -> list[dict[str, Any]]:
    """Launch ``torchrun -m bpmem.worker`` for one cell (``bpmem.sweep.launch``): one row per rank,
    judged by what the ranks recorded. torchrun's output is kept as ``log_dir/<cell_id>.log``
    (a temporary file without ``log_dir``)."""
    from bpmem.predict.estimate import estimate_ranks
    from bpmem.sweep.launch import cell_json, launch

    world = cell.step.world_size
    try:
        predictions = estimate_ranks(cell.spec, cell.step)
    except ValueError as error:
        return rank_rows(cell, run_id, env, config, [], error)
    if cell.step.strategy.peak_by_dry_run and cell.device == "cpu":
        from bpmem.predict.rank_dry_run import rank_peaks

        try:
            peaks = rank_peaks(cell.spec, cell.step)
            predictions = [dataclasses.replace(p, peak_bytes=peak) for p, peak in zip(predictions, peaks, strict=True)]
        except Exception:  # noqa: BLE001 - no dry run, no peak prediction: the row says so by its empty column
            pass
    rows = rank_rows(cell, run_id, env, config, predictions)
    with contextlib.ExitStack() as stack:
        folder = log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bpmem-log-")))
        outcome = launch([cell_json(cell.spec, cell.step, cell.device)], world, folder / f"{cell.cell_id}.log",
                         config.timeout_s, config.repeats, config.warmup)
    if outcome.rows is None:
        for row in rows:
            row.update(status="error", error=outcome.error)
        return rows
    measured = {row["rank"]: row for row in outcome.rows}
    for row in rows:
        got = measured[row["rank"]]
        # the device this rank ran on, as the worker placed it
        row.update({k: got[k] for k in MEASURED_RANK_COLUMNS}, device=got["device"], status="ok", error="")
    return rows
