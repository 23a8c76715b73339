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
import multiprocessing
import queue
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpmem.measurement.memory_trace import write_snapshot
from bpmem.measurement.timing import pin_threads, pinned_threads, threads_per_job
from bpmem.results.table import ResultsWriter, TimelineWriter, columns, done_cells
from bpmem.strategies.base import DEVICES, RANKS
from bpmem.strategies.placement import Machine, job_plan, place
from bpmem.sweep.cell import run_cell
from bpmem.sweep.config import Cell, SweepConfig
from bpmem.sweep.environment import environment
from bpmem.sweep.progress import Progress, cell_label
from bpmem.sweep.split import run_distributed_cell, run_model_parallel_cell, skipped_rows


def run_series(cells: list[Cell], run_id: str, env: dict[str, Any], config: SweepConfig,
               after_oom: bool = False, log_dir: Path | None = None, machine: Machine | None = None,
               trace: bool = False) -> Iterator[list[dict[str, Any]]]:
    """The rows of each cell of one series, in ascending batch size (one row, or one per rank
    for a distributed cell); a cell ``machine`` (this one by default) cannot hold is skipped,
    and after an OOM the rest of the series is skipped."""
    machine = machine or Machine.here()
    for cell in cells:
        placement = place(cell.device, cell.step.world_size, cell.step.strategy.placement, machine)
        if not placement.runs:
            yield skipped_rows(cell, run_id, env, config, placement.skipped)
        elif after_oom and not config.continue_after_oom:
            yield skipped_rows(cell, run_id, env, config, "a smaller batch of this series ran out of memory")
        else:
            if cell.step.strategy.placement == RANKS:
                rows = run_distributed_cell(cell, run_id, env, config, log_dir)
            elif cell.step.strategy.placement == DEVICES:
                rows = run_model_parallel_cell(cell, run_id, env, config, placement)
            else:
                rows = [run_cell(cell, run_id, env, config, trace)]
            after_oom = after_oom or any(row["status"] == "oom" for row in rows)
            yield rows


def _series(cells: list[Cell]) -> list[list[Cell]]:
    grouped: dict[Any, list[Cell]] = {}
    for cell in cells:
        grouped.setdefault(cell.series, []).append(cell)
    return list(grouped.values())


RETRY_S = 0.02  # how soon a deferred interrupt tries again
# Python code that C++ calls in the middle of an op: the dispatcher's rule lookups, fake tensors,
# dispatch modes, decompositions. A KeyboardInterrupt raised there is thrown through C++ frames
# that may not let it pass (a sweep once aborted with "terminate called after throwing an
# instance of 'pybind11::error_already_set'", exit -6, from torch/_library/simple_registry.py)
CALLED_FROM_CPP = ("/torch/_library/", "/torch/_subclasses/", "/torch/_ops.py", "/torch/utils/_python_dispatch.py",
                   "/torch/_decomp/", "/torch/_refs/", "/torch/_prims", "/torch/_meta_registrations.py",
                   "/bpmem/probes/", "/bpmem/measurement/fake_kernels.py")


def _called_from_cpp(frame: Any) -> bool:
    """Whether the signal came while the innermost Python frame runs on behalf of a C++ op."""
    code = getattr(frame, "f_code", None)
    if code is None:
        return False
    return code.co_name.startswith("__torch_") or any(part in code.co_filename for part in CALLED_FROM_CPP)


@dataclass
class _Guard:
    """Turns SIGINT/SIGTERM into KeyboardInterrupt, but never in the middle of writing a row,
    nor inside Python code that C++ called mid-op (``_called_from_cpp``): there it tries again
    every ``RETRY_S`` (SIGALRM) until the main thread is back in plain Python.

    The handler raises at once, for a quick stop, and also remembers the signal: Python runs
    signal handlers wherever the main thread is, and the probes run many ``weakref.finalize``
    callbacks, inside which an exception is printed ("Exception ignored in ...") and
    swallowed. So the sweep checks ``pending`` again before each cell and after each row,
    and a swallowed interrupt still stops it there."""

    writing: bool = False
    pending: bool = False
    previous: dict[int, Any] = field(default_factory=dict)

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGALRM and not self.pending:
            return  # only a deferred interrupt's retry is ours
        self.pending = True
        if self.writing:
            return
        if _called_from_cpp(frame):  # an exception here would reach C++ as one it cannot throw: abort
            signal.setitimer(signal.ITIMER_REAL, RETRY_S)  # raise at the next safe point instead
            return
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came, even one whose exception was swallowed."""
        if self.pending:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
            self.previous[signum] = signal.signal(signum, self._handler)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # no retry outlives the sweep
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
            log_dir: Path, machine: Machine, trace: bool, threads: int) -> None:
    """A worker process: runs whole series, sends each row back as soon as it is made."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    pin_threads(threads)  # the parent's count, so every row says the threads it stepped with
    while True:
        task = tasks.get()
        if task is None:
            results.put(None)
            return
        cells, after_oom = task
        for rows in run_series(cells, run_id, env_by_device[cells[0].device], config, after_oom, log_dir, machine,
                               trace):
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
              shard: Any = None, machine: Machine | None = None, trace: bool = False) -> SweepOutcome:
    """Run every cell not yet in ``out_dir/results.csv`` (of ``shard``'s slice, a
    ``bpmem.results.merge.Shard``, if given), appending a row per finished cell. Each cell runs where
    ``bpmem.strategies.placement.place`` puts it on ``machine`` (this one by default). With ``trace``,
    each measured training step's memory snapshot goes to ``out_dir/traces/<cell_id>.pickle``."""
    machine = machine or Machine.here()
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
    header = columns(with_cuda=any(d.startswith("cuda") for d in devices))
    progress = Progress(sum(len(todo) for todo, _ in tasks), quiet)
    guard = _Guard()
    timelines = TimelineWriter(out_dir / "timelines.csv", set(done))
    # every cell of this sweep steps with the same thread count; N CPU jobs share the cores
    with pinned_threads(threads_per_job(config.threads, jobs)) as threads, ResultsWriter(csv_path, header) as writer, \
            guard.installed():
        env_by_device = {device: {**environment(device), "threads": threads} for device in devices}

        def record(row: dict[str, Any]) -> None:
            events, snapshot = row.pop("_timeline", None), row.pop("_trace", None)

            def beside() -> None:  # what goes with the row: its timeline, its trace
                if events:
                    timelines.write(row, events)
                if snapshot:
                    write_snapshot(out_dir / "traces" / f"{row['cell_id']}.pickle", snapshot)

            guard.write(writer, row, beside)
            outcome.written += 1
            outcome.statuses[row["status"]] = outcome.statuses.get(row["status"], 0) + 1
            if on_row:
                on_row(row)

        def serially(todo_series: list[tuple[list[Cell], bool]]) -> None:
            for todo, after_oom in todo_series:
                rows = run_series(todo, run_id, env_by_device[todo[0].device], config, after_oom,
                                  out_dir / "logs", machine, trace)
                for cell in todo:
                    guard.check()
                    progress.show(cell_label(cell))
                    for row in next(rows):
                        record(row)
                    progress.advance(cell_label(cell))

        try:
            if jobs <= 1:
                serially(tasks)
            else:  # series that span several GPUs run alone, after the others
                plan = job_plan([series_devices(todo, machine) for todo, _ in tasks], jobs)
                shared = [(task, job) for task, job in zip(tasks, plan, strict=True) if job is not None]
                _run_parallel(shared, jobs, run_id, env_by_device, config, record, progress, out_dir / "logs",
                              machine, trace, threads)
                serially([task for task, job in zip(tasks, plan, strict=True) if job is None])
        except KeyboardInterrupt:
            outcome.interrupted = True
        finally:
            progress.close()
    return outcome


def series_devices(cells: list[Cell], machine: Machine) -> tuple[str, ...]:
    """Every device the cells of one series run on (none for cells skipped here)."""
    used: dict[str, None] = {}
    for cell in cells:
        used.update(dict.fromkeys(place(cell.device, cell.step.world_size, cell.step.strategy.placement,
                                        machine).devices))
    return tuple(used)


def _run_parallel(tasks: list[tuple[tuple[list[Cell], bool], int]], jobs: int, run_id: str,
                  env_by_device: dict[str, Any], config: SweepConfig, record: Callable[[dict[str, Any]], None],
                  progress: Progress, log_dir: Path, machine: Machine, trace: bool, threads: int) -> None:
    """One process per job, each task given to the job ``job_plan`` chose for it."""
    context = multiprocessing.get_context("spawn")
    task_queues = [context.Queue() for _ in range(jobs)]
    results = context.Queue()
    for task, job in tasks:
        task_queues[job].put(task)
    workers = [context.Process(target=_worker, daemon=True,
                               args=(queue_k, results, run_id, env_by_device, config, log_dir, machine, trace, threads))
               for queue_k in task_queues]
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
