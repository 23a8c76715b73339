"""One distributed cell: ``torchrun -m bpmem.worker`` launched, watched and judged.

A cell is judged by what its ranks recorded, never by exit codes alone:

- ``ok``: rank 0 wrote a complete ``rows.json`` (one row per rank, renamed into place only
  when whole) and every rank wrote its ``.rank<N>.done`` marker after the final barrier.
  A rank that then dies or hangs in torch's own teardown changes nothing (bpmem.sweep.teardown).
- ``error`` otherwise, with the first line of the real cause: the Python exception a rank
  wrote to ``.rank<N>.err``, else the first fatal line the failing rank printed
  ("terminate called ...", "Fatal Python error ...") with its exit code and signal, else
  the signal alone ("rank 1 died: exit code -9 (SIGKILL)"), else what torchrun said.

torchrun's output, every rank's lines prefixed with ``[defaultN]:``, is kept whole in
``logs/<cell_id>.log`` of the run folder, with bpmem's verdict as its last line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bpmem.sweep.teardown import done_marker

# the lines of a rank's own output that say why it died, most telling first
FATAL_PATTERNS: tuple[str, ...] = (r"terminate called", r"Fatal Python error", r"Segmentation fault",
                                   r"\w*(Error|Exception)\b.*:", r"Aborted", r"Killed")
SETTLE_S = 10.0  # how long ranks that recorded everything may take to exit before they are killed
COLLECTIVE_GRACE_S = 60  # how much longer than the cell a collective may wait


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a torchrun job left: every rank's row (None if the cell failed) and the cause."""

    rows: list[dict[str, Any]] | None
    error: str = ""
    returncode: int | None = None


def cell_json(spec: Any, step: Any, device: str = "cpu") -> dict[str, Any]:
    """A cell as the worker's ``--cell`` takes it: the model's fields (the MLP's, or your own
    model's factory, arguments, data and shapes as text), the step's, flat, and the cell's
    device (``cpu`` or ``cuda[:K]``: where its ranks run, whatever else the machine has)."""
    from bpmem.strategies.registry import flat_step

    model = spec.cell_fields() if hasattr(spec, "cell_fields") else dataclasses.asdict(spec)
    return {"spec": model, "step": flat_step(step), "device": device}


def cell_from_json(cell: dict[str, Any]) -> tuple[Any, Any]:
    """(model, step) of one ``cell_json``: a ``UserModel`` where the fields name a factory,
    else an ``MLPSpec``; every rank rebuilds the same model from them. The device is read
    apart, by ``cell_device``."""
    from bpmem.spec import MLPSpec
    from bpmem.strategies.registry import make_step

    fields = cell.get("spec", {})
    if "factory" in fields:
        from bpmem.models.user_model import UserModel

        spec: Any = UserModel.from_cell_fields(fields)
    else:
        spec = MLPSpec(**fields)
    return spec, make_step(**cell.get("step", {}))


def cell_device(cell: dict[str, Any]) -> str:
    """The device of one ``cell_json``: ``cpu`` where it names none (a cell never lands on a
    GPU it did not ask for)."""
    device = cell.get("device", "cpu")
    if not isinstance(device, str):
        raise ValueError(f"device: {device!r} is not allowed; allowed: cpu, cuda, cuda:N")
    return device


def complete_rows(out: Path, world: int, n_cells: int = 1) -> list[dict[str, Any]] | None:
    """The rows rank 0 wrote, if there is exactly one per (cell, rank) and every rank marked
    itself done; else None."""
    if not all(done_marker(out, rank).exists() for rank in range(world)):
        return None
    try:
        rows = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    keys = sorted((row.get("cell_index", 0), row.get("rank")) for row in rows if isinstance(row, dict))
    want = [(cell, rank) for cell in range(n_cells) for rank in range(world)]
    return rows if keys == want and len(rows) == len(want) else None


def launch(cells: list[dict[str, Any]], world: int, log_path: Path, timeout_s: float, repeats: int,
           warmup: int) -> Outcome:
    """Run ``cells`` (``cell_json``'s) in one torchrun job of ``world`` ranks,
    under ``timeout_s``; torchrun's output goes to ``log_path``; nothing of the job outlives
    this call."""
    with tempfile.TemporaryDirectory(prefix="bpmem-dist-") as folder:
        out = Path(folder) / "rows.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   "--tee=3", f"--log-dir={folder}/torchrun", "-m", "bpmem.sweep.worker", "--cell", json.dumps(cells),
                   "--out", str(out), "--repeats", str(repeats), "--warmup", str(warmup),
                   # collectives wait longer than the cell may run: a hang always ends at this
                   # launcher's deadline, with one message, never in a race with a peer's timeout
                   "--timeout-s", str(timeout_s + COLLECTIVE_GRACE_S)]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as log:
            log.write("$ " + " ".join(command[:9]) + " ...\n")
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                timed_out = _wait(process, out, world, len(cells), timeout_s)
            finally:
                kill_job(process)
        rows = complete_rows(out, world, len(cells))
        if rows is not None:
            verdict = Outcome(rows, "", process.returncode)
        elif timed_out:
            verdict = Outcome(None, f"timed out after {timeout_s:g} s (a rank hung); the job was killed",
                              process.returncode)
        else:
            verdict = Outcome(None, rank_failure(out, log_path, world, process.returncode), process.returncode)
    with log_path.open("a") as log:
        status = "ok: every rank recorded its work" if verdict.rows is not None else f"error: {verdict.error}"
        log.write(f"\nbpmem: torchrun exit status {verdict.returncode}; {status}\n")
    return verdict


def _wait(process: subprocess.Popen, out: Path, world: int, n_cells: int, timeout_s: float) -> bool:
    """Wait for torchrun to exit; once every rank has recorded its work, give it SETTLE_S
    more at most. True if the job ran past ``timeout_s`` without finishing."""
    start = time.monotonic()
    recorded_at = None
    while process.poll() is None:
        now = time.monotonic()
        if recorded_at is None and complete_rows(out, world, n_cells) is not None:
            recorded_at = now
        if recorded_at is not None and now - recorded_at > SETTLE_S:
            return False
        if now - start > timeout_s:
            return complete_rows(out, world, n_cells) is None
        time.sleep(0.1)
    return False


def rank_failure(out: Path, log_path: Path, world: int, returncode: int | None) -> str:
    """The first line of the real cause, for the rank that failed first (torchrun's "Root
    Cause"); other ranks then fail too, on a broken connection."""
    lines = log_path.read_text(errors="replace").splitlines()
    root, code = _root_cause(lines)
    errors = {rank: done_marker(out, rank).with_suffix(".err") for rank in range(world)}
    written = {rank: path for rank, path in errors.items() if path.exists()}
    if root is not None and root in written:
        return _first_line(written[root])
    if root is not None:
        fatal = _fatal_line(lines, root)
        where = f"exit code {code}{_signal_name(code)}"
        return f"rank {root}: {fatal} ({where})" if fatal else f"rank {root} died: {where}"
    if written:
        return _first_line(next(iter(written.values())))
    tail = [line for line in lines if line.strip()]
    return f"torchrun exited with status {returncode}" + (f": {tail[-1].strip()[:300]}" if tail else "")


def _root_cause(lines: list[str]) -> tuple[int | None, str]:
    """(rank, exit code) from torchrun's "Root Cause (first observed failure)" block."""
    start = next((i for i, line in enumerate(lines) if "Root Cause" in line), None)
    if start is None:
        return None, "?"
    found: dict[str, str] = {}
    for line in lines[start:]:
        key, _, value = line.strip().partition(":")
        if key.strip() in ("rank", "exitcode") and key.strip() not in found:
            found[key.strip()] = value.strip()
    rank = found.get("rank", "").split(" ")[0]
    return (int(rank) if rank.isdigit() else None), found.get("exitcode", "?").split(" ")[0]


def _fatal_line(lines: list[str], rank: int) -> str:
    """The first line of the rank's own output that says why it died, if it printed one."""
    own = [line.split(":", 1)[1].strip() for line in lines if line.startswith(f"[default{rank}]:")]
    for pattern in FATAL_PATTERNS:
        for line in own:
            if re.search(pattern, line):
                return line[:300]
    return ""


def _signal_name(code: str) -> str:
    if code.lstrip("-").isdigit() and int(code) < 0:
        with contextlib.suppress(ValueError):
            return f" ({signal.Signals(-int(code)).name})"
    return ""


def _first_line(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return lines[0] if lines else f"{path.name} is empty"


def kill_job(process: subprocess.Popen) -> None:
    """End torchrun and every rank. torchrun starts each rank in a session of its own, so a
    signal to torchrun's group does not reach them: collect the whole process tree first,
    ask torchrun to stop (it tears its workers down), then kill whatever is left."""
    import psutil

    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            child.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=10)
    psutil.wait_procs(tree, timeout=10)
