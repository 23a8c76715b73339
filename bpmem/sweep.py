"""``bpmem run``: a grid of cells, each measured and predicted, appended to results.csv.

Per cell: a fresh model, the probes, a fresh model again for timing (warm-up, then repeats:
median and IQR), and the estimate beside every measured figure. An out-of-memory error makes
the row ``oom``, frees what it can and skips the larger batches of the series (unless
``continue_after_oom``); any other exception makes an ``error`` row. The sweep goes on.

Stopping: Ctrl-C or SIGTERM finishes the row being written, stops any workers, and leaves a
valid CSV; ``--resume`` then runs only the cells that have no row yet.
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import queue
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bpmem.config import Cell, SweepConfig
from bpmem.dry_run import estimate_exactly, predicted_cuda_allocated
from bpmem.environment import environment
from bpmem.figures import FIGURE_NAMES, MEASURED_RANK_COLUMNS, PREDICTED_FIGURES, RankFigures
from bpmem.measure_cell import is_out_of_memory
from bpmem.progress import Progress, cell_label
from bpmem.results import ResultsWriter, TimelineWriter, columns, done_cells, model_columns
from bpmem.spec import InfeasibleBudget, MLPSpec
from bpmem.strategies.base import DEVICES, RANKS


def _release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _one_line(error: BaseException) -> str:
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
        "repeats": config.repeats, "warmup": config.warmup,
        "strategy_params": json.dumps(step.strategy_params(), sort_keys=True) if step.strategy_params() else "",
    }
    if distributed:
        return row
    try:  # the MLP by arithmetic; a user's model by its step on fake tensors
        arithmetic = isinstance(spec, MLPSpec) and step.amp == "none"  # autocast has no arithmetic yet
        predicted = estimate_exactly(spec, step) if arithmetic else _fake_estimate(spec, step)
    except InfeasibleBudget as error:  # no plan can fit: nothing to measure, say why
        row.update(status="skipped", error=_one_line(error))
        return row
    except ValueError as error:
        row.update(status="error", error=_one_line(error))
        return row
    row.update({f"predicted_{name}": getattr(predicted, name) for name in PREDICTED_FIGURES},
               predicted_recompute_flops=predicted.recompute_flops)
    if cell.device.startswith("cuda") and not step.strategy.opaque_to_probes:
        row["predicted_cuda_allocated_bytes"] = predicted_cuda_allocated(spec, step)
    if predicted.strategy_params:
        # the step's own parameters win: a plan's segment count must not hide the K asked for
        row["strategy_params"] = json.dumps({**predicted.strategy_params, **step.strategy_params()},
                                            sort_keys=True)
    return row


def _fake_estimate(spec: Any, step: Any) -> Any:
    from bpmem.measure_cell import measure

    if step.strategy.opaque_to_probes:
        raise ValueError(f"strategy: {step.strategy.name} cannot run on fake tensors; allowed with factory: "
                         "the other single-device strategies")
    return measure(spec, step, fake=True)


def timeline_cell(config: SweepConfig, cell: Cell) -> bool:
    """Keep the live-memory timeline of training cells of the deepest model at the batch
    nearest 64: one step per strategy, for the report's timeline plot."""
    depth = max(d for grid in config.model for d in dict(grid).get("depth", (1,)))
    batch = min(config.batch_sizes, key=lambda b: (abs(b - 64), b))
    return (isinstance(cell.spec, MLPSpec) and cell.step.mode == "train" and cell.spec.depth == depth
            and cell.step.batch_size == batch
            and cell.step.strategy.in_timeline_plot)


def run_cell(cell: Cell, run_id: str, env: dict[str, Any], config: SweepConfig) -> dict[str, Any]:
    """Measure one cell; never raises for OOM or errors, which become the row's status."""
    from bpmem.measure_cell import measure, time_steps, time_summary

    row = base_row(cell, run_id, env, config)
    if row.get("status") in ("error", "skipped"):
        return row
    try:
        measured = measure(cell.spec, cell.step, device=cell.device)
        times = time_steps(cell.spec, cell.step, cell.device, config.warmup, config.repeats)
    except Exception as error:  # noqa: BLE001 - every failure becomes a row, the sweep goes on
        row.update(status="oom" if is_out_of_memory(error) else "error", error=_one_line(error))
        _release_memory(cell.device)
        return row
    row.update({key: value for key, value in measured.to_dict().items() if key in FIGURE_NAMES})
    row.update(peak_phase=measured.peak_phase, recompute_flops=measured.recompute_flops)
    if timeline_cell(config, cell) and measured.timeline:
        row["_timeline"] = [(e.index, e.op, e.phase, e.live_bytes) for e in measured.timeline]
    row.update(status="ok", error="", **time_summary(times))
    return row


def run_series(cells: list[Cell], run_id: str, env: dict[str, Any], config: SweepConfig,
               after_oom: bool = False, log_dir: Path | None = None) -> Iterator[list[dict[str, Any]]]:
    """The rows of each cell of one series, in ascending batch size (one row, or one per rank
    for a distributed cell); after an OOM the rest of the series is skipped."""
    for cell in cells:
        if after_oom and not config.continue_after_oom:
            row = base_row(cell, run_id, env, config)
            row.update(status="skipped", error="a smaller batch of this series ran out of memory")
            yield [row]
            continue
        if cell.step.strategy.placement == RANKS:
            rows = run_distributed_cell(cell, run_id, env, config, log_dir)
        elif cell.step.strategy.placement == DEVICES:
            rows = run_model_parallel_cell(cell, run_id, env, config)
        else:
            rows = [run_cell(cell, run_id, env, config)]
        after_oom = after_oom or any(row["status"] == "oom" for row in rows)
        yield rows




def _rank_rows(cell: Cell, run_id: str, env: dict[str, Any], config: SweepConfig,
               predictions: list[RankFigures], error: BaseException | None = None) -> list[dict[str, Any]]:
    """One row per rank (device) of a split cell, with that rank's predictions; with
    ``error``, every row is an ``error`` row carrying its message."""
    rows = []
    for rank in range(cell.step.world_size):
        row = base_row(cell, run_id, env, config, distributed=True)
        row["rank"], row["world_size"] = rank, cell.step.world_size
        if error is not None:
            row.update(status="error", error=_one_line(error))
        else:
            predicted = predictions[rank]
            row.update({f"predicted_{k}": getattr(predicted, k)
                        for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes")})
            row.update(bubble_fraction=predicted.bubble_fraction, predicted_comm_bytes=predicted.comm_bytes,
                       textbook_saved_activation_bytes=predicted.textbook_saved_bytes,
                       predicted_peak_bytes=predicted.peak_bytes)
        rows.append(row)
    return rows


def run_model_parallel_cell(cell: Cell, run_id: str, env: dict[str, Any],
                            config: SweepConfig) -> list[dict[str, Any]]:
    """Measure a ``model-parallel`` cell in this process: one row per stage (device)."""
    from bpmem.strategies.model_parallel_runtime import stage_devices

    strategy = cell.step.strategy
    try:
        strategy.check(cell.spec, cell.step)
        devices = stage_devices(cell.device, cell.step.world_size)
        predictions = strategy.predict_stages(cell.spec, cell.step, separate_devices=len(set(devices)) > 1)
    except ValueError as error:
        return _rank_rows(cell, run_id, env, config, [], error)
    rows = _rank_rows(cell, run_id, env, config, predictions)
    try:
        measured = strategy.measure_stages(cell.spec, cell.step, cell.device, config.warmup, config.repeats)
    except Exception as error:  # noqa: BLE001 - every failure becomes a row, the sweep goes on
        for row in rows:
            row.update(status="oom" if is_out_of_memory(error) else "error", error=_one_line(error))
        _release_memory(cell.device)
        return rows
    for row, got in zip(rows, measured, strict=True):
        row.update({k: getattr(got, k) for k in MEASURED_RANK_COLUMNS}, device=got.device, status="ok", error="")
    return rows


def run_distributed_cell(cell: Cell, run_id: str, env: dict[str, Any], config: SweepConfig,
                         log_dir: Path | None = None) -> list[dict[str, Any]]:
    """Launch ``torchrun -m bpmem.worker`` for one cell (``bpmem.launch``): one row per rank,
    judged by what the ranks recorded. torchrun's output is kept as ``log_dir/<cell_id>.log``
    (a temporary file without ``log_dir``)."""
    from bpmem.estimate import estimate_ranks
    from bpmem.launch import cell_json, launch

    world = cell.step.world_size
    try:
        predictions = estimate_ranks(cell.spec, cell.step)
    except ValueError as error:
        return _rank_rows(cell, run_id, env, config, [], error)
    rows = _rank_rows(cell, run_id, env, config, predictions)
    with contextlib.ExitStack() as stack:
        folder = log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bpmem-log-")))
        outcome = launch([cell_json(cell.spec, cell.step)], world, folder / f"{cell.cell_id}.log", config.timeout_s,
                         config.repeats, config.warmup)
    if outcome.rows is None:
        for row in rows:
            row.update(status="error", error=outcome.error)
        return rows
    measured = {row["rank"]: row for row in outcome.rows}
    for row in rows:
        row.update({k: measured[row["rank"]][k] for k in MEASURED_RANK_COLUMNS}, status="ok", error="")
    return rows


def _series(cells: list[Cell]) -> list[list[Cell]]:
    grouped: dict[Any, list[Cell]] = {}
    for cell in cells:
        grouped.setdefault(cell.series, []).append(cell)
    return list(grouped.values())


@dataclass
class _Guard:
    """Turns SIGINT/SIGTERM into KeyboardInterrupt, but never in the middle of writing a row.

    The handler raises at once, for a quick stop, and also remembers the signal: Python runs
    signal handlers wherever the main thread is, and the probes run many ``weakref.finalize``
    callbacks, inside which an exception is printed ("Exception ignored in ...") and
    swallowed. So the sweep checks ``pending`` again before each cell and after each row,
    and a swallowed interrupt still stops it there."""

    writing: bool = False
    pending: bool = False
    previous: dict[int, Any] = field(default_factory=dict)

    def _handler(self, signum: int, frame: Any) -> None:
        self.pending = True
        if not self.writing:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came, even one whose exception was swallowed."""
        if self.pending:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handler)
        try:
            yield
        finally:
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)

    def write(self, writer: ResultsWriter, row: dict[str, Any], before: Callable[[], None] | None = None) -> None:
        """Write ``row`` (after ``before``, e.g. its timeline) with no interruption between."""
        self.writing = True
        try:
            if before is not None:
                before()
            writer.write(row)
        finally:
            self.writing = False
        if self.pending:
            raise KeyboardInterrupt


def _worker(tasks: Any, results: Any, run_id: str, env_by_device: dict[str, Any], config: SweepConfig,
            log_dir: Path) -> None:
    """A worker process: runs whole series, sends each row back as soon as it is made."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    while True:
        task = tasks.get()
        if task is None:
            results.put(None)
            return
        cells, after_oom = task
        for rows in run_series(cells, run_id, env_by_device[cells[0].device], config, after_oom, log_dir):
            for row in rows:
                results.put(row)


@dataclass
class SweepOutcome:
    """What a sweep did: rows written now, cells skipped as already done, interrupted or not."""

    written: int = 0
    already_done: int = 0
    interrupted: bool = False
    statuses: dict[str, int] = field(default_factory=dict)


def run_sweep(config: SweepConfig, devices: tuple[str, ...], out_dir: Path, run_id: str, jobs: int = 1,
              quiet: bool = False, on_row: Callable[[dict[str, Any]], None] | None = None,
              shard: Any = None) -> SweepOutcome:
    """Run every cell not yet in ``out_dir/results.csv`` (of ``shard``'s slice, a
    ``bpmem.merge.Shard``, if given), appending a row per finished cell."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "results.csv"
    done = done_cells(csv_path)
    cells = shard.cells(config.cells(devices)) if shard is not None else config.cells(devices)
    outcome = SweepOutcome(already_done=sum(cell.cell_id in done for cell in cells))
    tasks = []
    for series in _series(cells):
        todo = [cell for cell in series if cell.cell_id not in done]
        if todo:
            after_oom = any(done.get(cell.cell_id) == "oom" for cell in series)
            tasks.append((todo, after_oom))
    env_by_device = {device: environment(device) for device in devices}
    header = columns(with_cuda=any(d.startswith("cuda") for d in devices))
    progress = Progress(sum(len(todo) for todo, _ in tasks), quiet)
    guard = _Guard()
    timelines = TimelineWriter(out_dir / "timelines.csv", set(done))
    with ResultsWriter(csv_path, header) as writer, guard.installed():
        def record(row: dict[str, Any]) -> None:
            events = row.pop("_timeline", None)
            guard.write(writer, row, lambda: timelines.write(row, events) if events else None)
            outcome.written += 1
            outcome.statuses[row["status"]] = outcome.statuses.get(row["status"], 0) + 1
            if on_row:
                on_row(row)

        try:
            if jobs <= 1:
                for todo, after_oom in tasks:
                    rows = run_series(todo, run_id, env_by_device[todo[0].device], config, after_oom,
                                      out_dir / "logs")
                    for cell in todo:
                        guard.check()
                        progress.show(cell_label(cell))
                        for row in next(rows):
                            record(row)
                        progress.advance(cell_label(cell))
            else:
                _run_parallel(tasks, jobs, run_id, env_by_device, config, record, progress, out_dir / "logs")
        except KeyboardInterrupt:
            outcome.interrupted = True
        finally:
            progress.close()
    return outcome


def _run_parallel(tasks: list[tuple[list[Cell], bool]], jobs: int, run_id: str, env_by_device: dict[str, Any],
                  config: SweepConfig, record: Callable[[dict[str, Any]], None], progress: Progress,
                  log_dir: Path) -> None:
    """One process per job; with as many devices as jobs, each process keeps to one device."""
    context = multiprocessing.get_context("spawn")
    devices = list(env_by_device)
    task_queues = [context.Queue() for _ in range(jobs)]
    results = context.Queue()
    for index, task in enumerate(tasks):
        worker = devices.index(task[0][0].device) % jobs if len(devices) >= jobs else index % jobs
        task_queues[worker].put(task)
    workers = [context.Process(target=_worker, args=(task_queues[k], results, run_id, env_by_device,
                                                                  config, log_dir), daemon=True) for k in range(jobs)]
    for task_queue in task_queues:
        task_queue.put(None)
    for worker in workers:
        worker.start()
    running = jobs
    try:
        while running:
            try:
                row = results.get(timeout=0.5)
            except queue.Empty:
                if not any(w.is_alive() for w in workers) and results.empty():
                    break  # a worker died without saying goodbye; its cells stay to-do
                continue
            if row is None:
                running -= 1
                continue
            record(row)
            if row["rank"] == row["world_size"] - 1:  # a split cell's last rank: the cell is done
                progress.advance(row["cell_id"])
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join()
