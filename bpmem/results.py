"""results.csv: the row schema (DESIGN §2), environment metadata, and safe appends.

One row per measured cell (and rank). Rows are appended and flushed, then fsync'd, as each
cell finishes, each as a single write, so an interrupted sweep leaves a valid file. A line
cut short by a hard kill (no trailing newline) is dropped when the file is next opened.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

STATUSES: tuple[str, ...] = ("ok", "oom", "error", "skipped")

BYTE_COLUMNS: tuple[str, ...] = (
    "params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes", "peak_bytes",
    "inference_peak_bytes", "predicted_params_bytes", "predicted_grads_bytes", "predicted_optimizer_bytes",
    "predicted_saved_activation_bytes", "predicted_peak_bytes", "predicted_inference_peak_bytes",
)
CUDA_COLUMNS: tuple[str, ...] = ("cuda_max_allocated_bytes", "cuda_max_reserved_bytes")

COLUMNS: tuple[str, ...] = (
    "run_id", "cell_id", "timestamp", "bpmem_version", "torch_version", "python_version", "git_commit",
    "hostname", "device", "device_name", "cuda_version",
    "input_dim", "hidden_dim", "output_dim", "depth", "bias", "activation", "dtype", "loss", "l2",
    "optimizer", "batch_size", "mode", "strategy", "strategy_params", "world_size", "rank",
    "status", "error",
    *BYTE_COLUMNS,
    "saved_hook_bytes", "recompute_flops", "predicted_recompute_flops",
    "textbook_saved_activation_bytes", "bubble_fraction", "predicted_comm_bytes", "equivalence_max_rel_err",
    "peak_phase", "step_time_median_s", "step_time_iqr_s", "repeats", "warmup",
)


def columns(with_cuda: bool) -> tuple[str, ...]:
    """The header: the CUDA allocator columns only where a sweep has a CUDA device."""
    return COLUMNS + (CUDA_COLUMNS if with_cuda else ())


def _drop_partial_last_line(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class ResultsWriter:
    """Appends rows to ``path``, writing the header if the file is new or empty."""

    def __init__(self, path: str | Path, header: tuple[str, ...]) -> None:
        self.path = Path(path)
        if self.path.exists():
            _drop_partial_last_line(self.path)
            with self.path.open(newline="") as handle:
                existing = next(csv.reader(handle), None)
            if existing is not None and tuple(existing) != header:
                raise ValueError(f"{self.path} has other columns than this sweep writes; use a new --out")
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = self.path.open("a", newline="")
        self.header = header
        if new:
            self._write_line(header)

    def _write_line(self, values: Iterable[Any]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(values)
        self._handle.write(buffer.getvalue())  # one write per row: a row is all there or not at all
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def write(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(self.header)
        if unknown:
            raise KeyError(f"not a results.csv column: {sorted(unknown)}")
        self._write_line(_cell_text(row.get(column)) for column in self.header)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def done_cells(path: str | Path) -> dict[str, str]:
    """Cells already recorded in ``path``, with their status: what ``--resume`` skips."""
    path = Path(path)
    if not path.exists():
        return {}
    _drop_partial_last_line(path)
    with path.open(newline="") as handle:
        return {row["cell_id"]: row["status"] for row in csv.DictReader(handle) if row.get("cell_id")}


def read_results(path: str | Path):  # -> pandas.DataFrame
    """Load results.csv with integer byte columns (pandas' nullable Int64: failed cells
    have no measured bytes) and booleans for ``bias``."""
    import pandas as pd

    text = ("error", "strategy_params", "peak_phase", "git_commit", "cuda_version")
    frame = pd.read_csv(path, dtype={column: str for column in text})
    for column in frame.columns:
        if column.endswith(("_bytes", "_flops")) or column in ("world_size", "rank", "repeats", "warmup",
                                                                "batch_size"):
            frame[column] = frame[column].astype("Int64")
    if "bias" in frame:
        frame["bias"] = frame["bias"].astype(str).str.lower().eq("true")
    for column in text:
        if column in frame:
            frame[column] = frame[column].fillna("")
    return frame
