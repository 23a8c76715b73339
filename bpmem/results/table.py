"""results.csv: the row schema (docs/results-csv.md lists every column), environment metadata, and safe appends.

One row per measured cell (and rank). Rows are appended and flushed, then fsync'd, as each
cell finishes, each as a single write, so an interrupted sweep leaves a valid file. A line
cut short by a hard kill (no trailing newline) is dropped when the file is next opened.

``normal_value`` says what a value may be. The reader hands on its normalised text (a file that
pandas or a spreadsheet rewrote reads as bpmem wrote it); the writer checks each value with it.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bpmem.figures import CUDA_FIGURES, PREDICTED_FIGURES

STATUSES: tuple[str, ...] = ("ok", "oom", "error", "skipped")

# the allocator's own figures came later: their columns go at the end, so older files stay readable
ALLOCATOR_COLUMNS: tuple[str, ...] = ("allocator_peak_bytes", "predicted_allocator_peak_bytes", "scratch_bytes")
# the figures that bpmem both measures and predicts, each beside its prediction's column
BYTE_COLUMNS: tuple[str, ...] = (*PREDICTED_FIGURES, *(f"predicted_{name}" for name in PREDICTED_FIGURES))
# on CUDA rows: the allocator's figures, and the predicted peak with every storage rounded up to
# the allocator's 512 B blocks (bpmem.predict.dry_run.predicted_cuda_allocated), max_memory_allocated's twin
CUDA_COLUMNS: tuple[str, ...] = (*CUDA_FIGURES, "predicted_cuda_allocated_bytes",
                                 # added later: the caching allocator model's reserved peak (predict.cuda_reserved)
                                 "predicted_cuda_reserved_bytes")

COLUMNS: tuple[str, ...] = (
    "run_id", "cell_id", "timestamp", "bpmem_version", "torch_version", "python_version", "git_commit",
    "hostname", "device", "device_name", "cuda_version",
    "model", "model_kwargs", "input_dim", "hidden_dim", "output_dim", "depth", "bias", "activation", "dtype", "loss",
    "l2", "optimizer", "weight_decay", "optimizer_impl", "amp",
    "batch_size", "mode", "strategy", "strategy_params", "world_size", "rank",
    "status", "error",
    *BYTE_COLUMNS,
    "saved_hook_bytes", "recompute_flops", "predicted_recompute_flops",
    "textbook_saved_activation_bytes", "bubble_fraction", "predicted_comm_bytes", "equivalence_max_rel_err",
    "peak_phase", "step_time_median_s", "step_time_iqr_s", "repeats", "warmup",
    # added later (older files lack them): the intra-op threads the step was timed with, whether
    # its time is noisy (bpmem.measurement.timing), and the peak's bytes by category (JSON)
    "threads", "time_noisy", "peak_by_category",
    # added later still: the steps' CPU time, whether they waited for cores, and a strategy's
    # overhead timed in pairs with the plain step, its interval and pair count (bpmem.measurement.timing_pairs)
    "step_cpu_time_median_s", "time_contended", "time_overhead", "time_overhead_low", "time_overhead_high",
    "time_pairs",
    # added later again: the allocator's peak over the same step, its prediction, and its scratch
    # (bpmem.measurement.allocator_step, bpmem.predict.allocator)
    *ALLOCATOR_COLUMNS,
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
        """Check every value of ``row`` as the reader does, then append it. A value the reader refuses
        raises ResultsWriteError before any of the row is written: the rows before it stay readable."""
        unknown = set(row) - set(self.header)
        if unknown:
            raise KeyError(f"not a results.csv column: {sorted(unknown)}")
        texts = []
        for column in self.header:
            try:
                texts.append(normal_value(column, _cell_text(row.get(column))))
            except BadValue as error:
                raise ResultsWriteError(f"{self.path}: cell {row.get('cell_id')!r}: {error}; the row was not written "
                                        "(a bug in bpmem: the rows before it are in the file)") from None
        self._write_line(texts)

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
        return repr(float(value))  # numpy's float64 is a float whose repr is "np.float64(1.5)"
    return str(value)


class ResultsFileError(ValueError):
    """A results.csv that cannot be read as one: the message names the file, the line and
    the column, and says what was expected (``bpmem check`` and ``report`` exit 2)."""


class ResultsWriteError(RuntimeError):
    """A value bpmem was about to write that its own reader refuses: a bpmem bug (the CLI exits 3)."""


class BadValue(ValueError):
    """One value that results.csv does not allow; the message is ``COLUMN is 'VALUE'; allowed: ...``."""


# every results.csv has these; the rest are checked where they are present
REQUIRED_COLUMNS: tuple[str, ...] = ("cell_id", "status")
INTEGER_COLUMNS: tuple[str, ...] = ("world_size", "rank", "repeats", "warmup", "batch_size", "depth", "input_dim",
                                    "hidden_dim", "output_dim", "threads", "time_pairs")
# true or false in any case: bpmem writes true/false, pandas True/False, spreadsheets TRUE/FALSE
BOOLEAN_COLUMNS: tuple[str, ...] = ("bias", "time_noisy", "time_contended")
# text columns that label every row: a row without them cannot be placed in a table or plot
NON_EMPTY_COLUMNS: tuple[str, ...] = ("cell_id", "device", "mode", "strategy", "activation", "dtype", "loss",
                                      "optimizer", "bias", "batch_size", "depth", "input_dim", "hidden_dim",
                                      "output_dim", "world_size", "rank")
FLOAT_COLUMNS: tuple[str, ...] = ("l2", "weight_decay", "bubble_fraction", "equivalence_max_rel_err",
                                  "step_time_median_s", "step_time_iqr_s", "step_cpu_time_median_s", "time_overhead",
                                  "time_overhead_low", "time_overhead_high")


def _choices() -> dict[str, tuple[str, ...]]:
    from bpmem.spec import ACTIVATIONS, DTYPES, LOSSES, MODES, OPTIMIZERS
    from bpmem.strategies.registry import STRATEGIES

    return {"mode": MODES, "strategy": STRATEGIES, "activation": ACTIVATIONS, "dtype": tuple(DTYPES),
            "loss": (*LOSSES, "none"), "optimizer": OPTIMIZERS}


# what every ok row of `bpmem run` holds, whatever the strategy
MEASURED_COLUMNS: tuple[str, ...] = ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes",
                                     "peak_bytes")
# text columns: read as text even when every value happens to look like a number
TEXT_COLUMNS: tuple[str, ...] = (
    "model", "model_kwargs", "run_id", "cell_id", "timestamp", "bpmem_version", "torch_version", "python_version",
    "git_commit", "hostname", "device", "device_name", "cuda_version", "activation", "dtype", "loss", "optimizer",
    "optimizer_impl", "amp",
    "mode", "strategy", "strategy_params", "status", "error", "peak_phase")


def load_rows(path: str | Path, required: tuple[str, ...] = REQUIRED_COLUMNS,
              ok_needs: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The rows of a results.csv, checked before anyone trusts them: a header with
    ``required``, as many fields in every row as in the header, quotes closed, a known
    ``status``, integers in the byte and count columns, and each (cell_id, rank) once.
    Every value is as bpmem writes it (``normal_value``: ``true``, ``269316``, empty), also
    where pandas or a spreadsheet wrote ``TRUE``, ``269316.0`` or ``NaN``. Raises
    ResultsFileError naming the first problem."""
    return _checked(Path(path), required, ok_needs)[1]


def _checked(path: Path, required: tuple[str, ...], ok_needs: tuple[str, ...]
             ) -> tuple[list[str], list[dict[str, str]]]:
    """``load_rows``, with the header (which a file of no rows still has)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsFileError(f"{path}: no such file; allowed: a results.csv that `bpmem run` wrote") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ResultsFileError(f"{path}: cannot be read ({error}); allowed: a results.csv") from None
    try:
        lines = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as error:
        raise ResultsFileError(f"{path}: not a CSV file ({error}); allowed: a results.csv") from None
    if not lines or not any(field.strip() for field in lines[0]):
        raise ResultsFileError(f"{path}: is empty; allowed: a results.csv with a header and rows")
    header = lines[0]
    missing = [column for column in required if column not in header]
    if missing:
        raise ResultsFileError(f"{path}: has no column {missing[0]!r}; allowed: a results.csv with the columns "
                               + ", ".join(required))
    rows, seen = [], {}
    for number, fields in enumerate(lines[1:], start=2):
        if not fields:
            continue
        if len(fields) != len(header):
            raise ResultsFileError(f"{path}, line {number}: {len(fields)} fields, the header has {len(header)}")
        row = _check_row(path, number, dict(zip(header, fields, strict=True)))
        for column in ok_needs:
            # a split cell's stages that share one device share one peak, on the first one's row
            shared_peak = column == "peak_bytes" and row.get("world_size", "1").strip() not in ("", "1")
            if row["status"] == "ok" and not row.get(column, "").strip() and not shared_peak:
                raise ResultsFileError(f"{path}, line {number}: status is ok but {column} is empty; allowed: the "
                                       "measured figures in every ok row")
        key = (row["cell_id"], row.get("rank") or "0")
        if key in seen:
            raise ResultsFileError(f"{path}, line {number}: cell {key[0]!r} rank {key[1]} already on line "
                                   f"{seen[key]}; allowed: each (cell_id, rank) once")
        seen[key] = number
        rows.append(row)
    return header, rows


# the MLP's own columns: empty on the rows of a user's model (its `model` column names it)
MLP_COLUMNS: tuple[str, ...] = ("input_dim", "hidden_dim", "output_dim", "depth", "bias", "activation", "dtype", "l2")


def model_columns(spec: Any) -> dict[str, Any]:
    """The model's columns of a row: the MLP's shape, or a user model's factory and arguments."""
    if hasattr(spec, "factory"):
        return {"model": spec.factory, "model_kwargs": spec.kwargs_json if spec.kwargs_json != "{}" else "",
                "loss": spec.loss, **dict.fromkeys(MLP_COLUMNS, "")}
    return {"model": "mlp", "model_kwargs": "", "input_dim": spec.input_dim, "hidden_dim": spec.hidden_dim,
            "output_dim": spec.output_dim, "depth": spec.depth, "bias": spec.bias, "activation": spec.activation,
            "dtype": spec.dtype, "loss": spec.loss, "l2": spec.l2}


def _check_row(path: Path, number: int, row: dict[str, str]) -> dict[str, str]:
    """``row`` normalised (``normal_value``), or ResultsFileError naming file, line and column."""
    where = f"{path}, line {number}"
    try:
        # the row's identity first: its problem is the one worth naming
        normal = {column: normal_value(column, row[column]) for column in ("cell_id", "status")}
        normal.update((column, normal_value(column, value)) for column, value in row.items() if column not in normal)
    except BadValue as error:
        raise ResultsFileError(f"{where}: {error}") from None
    for column, value in normal.items():
        mlp_only = column in MLP_COLUMNS and normal.get("model", "mlp") not in ("", "mlp")
        if column in NON_EMPTY_COLUMNS and not value.strip() and not mlp_only:
            raise ResultsFileError(f"{where}: {column} is empty; allowed: the value `bpmem run` wrote")
    return {column: normal[column] for column in row}  # the header's order


# digits, a point, an exponent: how pandas writes an integer column with a missing value
# (269316.0), or a spreadsheet a large one (2.69316E+05); no sign, no inf, no nan
_FLOAT_INTEGER = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")


def _integer(text: str) -> int | None:
    """``text`` as an integer, or None. Digits up to int64's largest (pandas' Int64 holds it);
    in a float's spelling, only a whole number a float holds exactly (up to 2**53)."""
    if len(text) > 30 or not _FLOAT_INTEGER.fullmatch(text):
        return None
    if text.isdigit():  # ASCII digits only: the pattern allows no others
        return int(text) if int(text) < 2**63 else None
    number = float(text)
    return int(number) if number.is_integer() and number <= 2**53 else None


def normal_value(column: str, value: str) -> str:
    """``value`` of ``column`` as bpmem writes it, or BadValue saying what ``column`` allows.
    Missing is empty (``NaN`` and ``nan`` too: pandas' missing value); an integer column's
    value is digits (``269316.0`` reads as ``269316``); a boolean's is ``true`` or ``false``
    (``True``, ``TRUE``: pandas' and spreadsheets' spellings). Whether a value may be missing
    is the row's question (``_check_row``), except for ``cell_id`` and ``status``."""
    if column == "cell_id":  # the row's name, never missing: kept as it is, even "nan"
        if not value.strip():
            raise BadValue("cell_id is empty")
        return value
    if column == "status":
        if value not in STATUSES:
            raise BadValue(f"status {value[:40]!r}; allowed: {', '.join(STATUSES)}")
        return value
    if value == "" or value.lower() == "nan":
        return ""
    if column.endswith(("_bytes", "_flops")) or column in INTEGER_COLUMNS:
        least = 0 if column in ("rank", "warmup", "time_pairs") or column not in INTEGER_COLUMNS else 1
        number = _integer(value)
        if number is None or number < least:
            raise BadValue(f"{column} is {value[:40]!r}; allowed: an integer >= {least} or empty")
        return str(number)
    if column in BOOLEAN_COLUMNS:
        if value.lower() not in ("true", "false"):
            raise BadValue(f"{column} is {value[:40]!r}; allowed: true, false (in any case) or empty")
        return value.lower()
    if column == "strategy_params" and not _json_object(value):
        raise BadValue(f"strategy_params is {value[:40]!r}; allowed: a JSON object or empty")
    if column in FLOAT_COLUMNS and not _is_float(value):
        raise BadValue(f"{column} is {value[:40]!r}; allowed: a number or empty")
    choices = _choices()
    if column in choices and value not in choices[column]:
        raise BadValue(f"{column} is {value[:40]!r}; allowed: {', '.join(choices[column])}")
    return value


def _json_object(text: str) -> bool:
    import json

    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


TIMELINE_COLUMNS: tuple[str, ...] = ("cell_id", "strategy", "strategy_params", "index", "op", "phase",
                                     "live_bytes")


class TimelineWriter:
    """timelines.csv beside results.csv, with the same guarantees: each cell's events in
    one write, fsync'd, before that cell's row. Opening it drops a line cut short and every
    event of a cell that has no row in results.csv (a kill between the two writes), so
    ``--resume`` writes that cell's timeline once, not twice."""

    def __init__(self, path: str | Path, recorded_cells: set[str]) -> None:
        self.path = Path(path)
        if self.path.exists():
            _drop_partial_last_line(self.path)
            with self.path.open(newline="") as handle:
                rows = list(csv.reader(handle))
            kept = [row for row in rows[1:] if row and row[0] in recorded_cells]
            if len(kept) != len(rows) - 1:
                buffer = io.StringIO()
                csv.writer(buffer, lineterminator="\n").writerows([list(TIMELINE_COLUMNS), *kept])
                partial = self.path.with_name(self.path.name + ".partial")
                partial.write_text(buffer.getvalue())
                partial.replace(self.path)

    def write(self, row: Mapping[str, Any], events: Iterable[tuple[int, str, str, int]]) -> None:
        buffer = io.StringIO()
        out = csv.writer(buffer, lineterminator="\n")
        new = not self.path.exists() or self.path.stat().st_size == 0
        if new:
            out.writerow(TIMELINE_COLUMNS)
        out.writerows([row["cell_id"], row["strategy"], row.get("strategy_params", ""), *event] for event in events)
        with self.path.open("a", newline="") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())


def done_cells(path: str | Path) -> dict[str, str]:
    """Cells already recorded in ``path``, with their status: what ``--resume`` skips."""
    path = Path(path)
    if not path.exists():
        return {}
    _drop_partial_last_line(path)
    with path.open(newline="") as handle:
        return {row["cell_id"]: row["status"] for row in csv.DictReader(handle) if row.get("cell_id")}


def read_results(path: str | Path, required: tuple[str, ...] = REQUIRED_COLUMNS,
                 ok_needs: tuple[str, ...] = ()):  # -> pandas.DataFrame
    """Load results.csv with integer byte columns (pandas' nullable Int64: failed cells
    have no measured bytes) and booleans for ``bias``. The file is checked first
    (``load_rows``): a malformed one raises ResultsFileError."""
    import pandas as pd

    header, rows = _checked(Path(path), required, ok_needs)
    # pandas reads the checked rows, not the file: the values normalised, so a file that pandas
    # rewrote (True, 269316.0, NaN) gives the frame its original gives
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *([row[c] for c in header] for row in rows)])
    buffer.seek(0)
    frame = pd.read_csv(buffer, dtype={column: str for column in TEXT_COLUMNS})
    for column in frame.columns:
        if column.endswith(("_bytes", "_flops")) or column in ("world_size", "rank", "repeats", "warmup",
                                                                "batch_size"):
            frame[column] = frame[column].astype("Int64")
    if "bias" in frame:
        frame["bias"] = frame["bias"].astype(str).str.lower().eq("true")
    for column in TEXT_COLUMNS:
        if column in frame:
            frame[column] = frame[column].fillna("")
    return frame

