"""One cell of a sweep, on one device: its row's identifying and environment columns, its
predictions (``base_row``), and its measurement (``run_cell``). Failures become the row's
status, never an exception: an OOM is ``oom``, anything else ``error``, a budget no plan can
meet ``skipped``. Split cells (one row per rank) are ``bpmem.sweep.split``'s.
"""

from __future__ import annotations

import gc
import json
from datetime import UTC, datetime
from typing import Any

from bpmem.figures import FIGURE_NAMES, PREDICTED_FIGURES
from bpmem.measurement.cell import is_out_of_memory
from bpmem.predict.allocator import applies as allocator_prediction_applies
from bpmem.predict.allocator import predict_allocator_peak
from bpmem.predict.cuda_reserved import predict_cuda_allocator
from bpmem.predict.dry_run import estimate_exactly, predicted_cuda_allocated
from bpmem.results.table import model_columns
from bpmem.spec import InfeasibleBudget, MLPSpec
from bpmem.sweep.config import Cell, SweepConfig


def release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


def base_row(cell: Cell, run_id: str, env: dict[str, Any], config: SweepConfig,
             distributed: bool = False) -> dict[str, Any]:
    """The identifying and environment columns of a cell's row, plus its predictions
    (per-rank predictions of a distributed cell are added by ``run_distributed_cell``)."""
    spec, step = cell.spec, cell.step
    row = {
        "run_id": run_id, "cell_id": cell.cell_id,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        **{k: env[k] for k in ("bpmem_version", "torch_version", "python_version", "git_commit", "hostname",
                               "device_name", "cuda_version")},
        "device": cell.device,
        **model_columns(spec), "optimizer": step.optimizer, "weight_decay": step.weight_decay,
        # the implementation that runs on this device, not the request ("default")
        "optimizer_impl": step.resolved_impl(cell.device.split(":")[0]), "amp": step.amp,
        "batch_size": step.batch_size,
        "mode": step.mode, "strategy": step.strategy.name, "world_size": 1, "rank": 0,
        "repeats": config.repeats, "warmup": config.warmup, "threads": env.get("threads"),
        "strategy_params": json.dumps(step.strategy_params(), sort_keys=True) if step.strategy_params() else "",
    }
    if distributed:
        return row
    try:  # the MLP by arithmetic; a user's model by its step on fake tensors
        arithmetic = isinstance(spec, MLPSpec) and step.amp == "none"  # autocast has no arithmetic yet
        predicted = estimate_exactly(spec, step, cell.device) if arithmetic else _fake_estimate(spec, step, cell.device)
    except InfeasibleBudget as error:  # no plan can fit: nothing to measure, say why
        row.update(status="skipped", error=one_line(error))
        return row
    except Exception as error:  # noqa: BLE001 - a bad cell or the user's own code: an error row, the sweep goes on
        if isinstance(error, ValueError) or _users_error(spec, error) is not None:
            row.update(status="error", error=_users_error(spec, error) or one_line(error))
            return row
        raise  # bpmem's own bug: exit 3
    row.update({f"predicted_{name}": getattr(predicted, name) for name in PREDICTED_FIGURES},
               predicted_recompute_flops=predicted.recompute_flops)
    if cell.device.startswith("cuda") and not step.strategy.compiles:
        if step.mode == "train" and step.world_size == 1:  # the caching allocator model over the dry run's allocations
            cuda = predict_cuda_allocator(spec, step, cell.device)
            row["predicted_cuda_reserved_bytes"] = cuda.reserved_bytes
            row["predicted_cuda_allocated_bytes"] = cuda.step_allocated_bytes
        else:
            row["predicted_cuda_allocated_bytes"] = predicted_cuda_allocated(spec, step, cell.device)
    if allocator_prediction_applies(spec, step, cell.device):
        try:  # the dry run plus each op's calibrated scratch (bpmem.predict.allocator)
            row["predicted_allocator_peak_bytes"] = predict_allocator_peak(spec, step).allocator_peak_bytes
        except ValueError:
            pass  # the calibration's ops do not line up with the dry run's: no prediction, the cell runs
    if predicted.strategy_params:
        # the step's own parameters win: a plan's segment count must not hide the K asked for
        row["strategy_params"] = json.dumps({**predicted.strategy_params, **step.strategy_params()},
                                            sort_keys=True)
    return row


def _users_error(spec: Any, error: BaseException) -> str | None:
    """The one line naming the user's file:line when the user's model (or the loss on its
    output) raised ``error``; None for the MLP, or when bpmem raised it."""
    if isinstance(spec, MLPSpec):
        return None
    from bpmem.models.user_model import user_code_error

    return user_code_error(error, spec.factory, spec.loss)


def _fake_estimate(spec: Any, step: Any, device: str = "cpu") -> Any:
    """The step on fake tensors: on the cell's device where it exists here (CUDA's autocast
    policy and kernels for a CUDA cell), else on the CPU."""
    from bpmem.measurement.cell import measure
    from bpmem.predict.dry_run import dry_run_device

    return measure(spec, step, device=dry_run_device(device, step), fake=True)


def timeline_cell(config: SweepConfig, cell: Cell) -> bool:
    """Keep the live-memory timeline of training cells of the deepest model at the batch
    nearest 64: one step per strategy, for the report's timeline plot."""
    depth = max(d for grid in config.model for d in dict(grid).get("depth", (1,)))
    batch = min(config.batch_sizes, key=lambda b: (abs(b - 64), b))
    return (isinstance(cell.spec, MLPSpec) and cell.step.mode == "train" and cell.spec.depth == depth
            and cell.step.batch_size == batch
            and cell.step.strategy.in_timeline_plot)


def run_cell(cell: Cell, run_id: str, env: dict[str, Any], config: SweepConfig, trace: bool = False) -> dict[str, Any]:
    """Measure one cell; never raises for OOM or errors, which become the row's status. With
    ``trace``, a training cell's memory snapshot rides along as ``row["_trace"]``."""
    from bpmem.measurement.cell import measure, time_steps

    row = base_row(cell, run_id, env, config)
    if row.get("status") in ("error", "skipped"):
        return row
    if cell.device.startswith("cuda"):
        # Reserved memory only grows while nothing empties the cache, so without this a CUDA
        # row's max_memory_reserved would hold every earlier cell's segments. Emptied here,
        # the allocator holds only what stays alive (the cuBLAS workspace) as the cell starts:
        # the process predicted_cuda_reserved_bytes describes.
        release_memory(cell.device)
    try:
        measured = measure(cell.spec, cell.step, device=cell.device, trace=trace and cell.step.mode == "train")
        # the plain step alone; a strategy's in pairs with the plain step (bpmem.measurement.timing_pairs)
        times = time_steps(cell.spec, cell.step, cell.device, config.warmup, config.repeats,
                           max_seconds=config.timing_cap_s)
    except Exception as error:  # noqa: BLE001 - every failure becomes a row, the sweep goes on
        row.update(status="oom" if is_out_of_memory(error) else "error",
                   error=_users_error(cell.spec, error) or one_line(error))
        release_memory(cell.device)
        return row
    row.update({key: value for key, value in measured.to_dict().items() if key in FIGURE_NAMES})
    row.update(peak_phase=measured.peak_phase, recompute_flops=measured.recompute_flops,
               peak_by_category=json.dumps(measured.peak_by_category, sort_keys=True) if measured.peak_by_category
               else "")
    if timeline_cell(config, cell) and measured.timeline:
        row["_timeline"] = [(e.index, e.op, e.phase, e.live_bytes) for e in measured.timeline]
    if measured.trace:
        row["_trace"] = measured.trace
    row.update(status="ok", error="", **times)
    return row
