"""How a torchrun rank ends without aborting, and how it says that it finished.

Why ranks used to die at exit (SIGABRT, "terminate called without an active exception"),
on torch 2.13.0+cpu with gloo (``benchmarks/teardown_abort.py`` reproduces it without bpmem):

- gdb shows the abort on a ``pt_gloo_runloop`` thread, in the destructor of a finished work
  object: its copy of the caller's thread-local state holds a Python object, and releasing
  it takes the GIL. Python is finalizing by then, so taking the GIL ends the thread with
  ``pthread_exit``; the unwinding runs into a ``noexcept`` C++ destructor and the process
  calls ``std::terminate``.
- The Python object is the ``contextvars`` context that autograd stashes in thread-local
  state for the length of every backward. Collectives started inside backward (DDP's bucket
  all-reduces, FSDP's reduce-scatters, a DTensor's all-reduce) copy it into their works.
  With the stash disabled, the repro aborts in 0 of 30 runs instead of 9 of 30.
- Those works stay reachable from distributed objects that live until the interpreter exits
  (the DDP reducer, FSDP's hook cycles, pipeline stages and schedules). Dropping those
  objects, and collecting the garbage, before the final barrier: 0 aborts in 20 runs.

The fix has two halves:

1. ``release``: every distributed object (the wrapped model, stages, schedules, DTensors,
   the optimizer over them) is dropped and garbage collected while Python is fully alive,
   and only then does the final barrier run, so no work that holds Python state outlives
   the process group.
2. ``mark_done``: after that final barrier each rank writes a marker file. The launcher
   judges a cell by what the ranks recorded (complete rows from rank 0, every rank's
   marker), not by their exit codes, so even an abort in torch's own teardown cannot turn
   a finished cell into an ``error`` row.
"""

from __future__ import annotations

import contextlib
import gc
import json
import signal
from collections.abc import Iterator
from pathlib import Path


def live_distributed_objects() -> list[str]:
    """Type names of the distributed objects still alive in this process (after a collection)."""
    # imported here: the launcher imports this module and must not import torch
    from bpmem.torch_private import distributed_object_types

    gc.collect()
    kinds = distributed_object_types()
    # type(obj), not isinstance: some torch objects warn when their __class__ is read
    return sorted(type(obj).__name__ for obj in gc.get_objects() if issubclass(type(obj), kinds))


def release() -> list[str]:
    """Collect the garbage that still holds distributed objects (FSDP's and DDP's hooks form
    reference cycles, so dropping the last name is not enough) and return what survives,
    which should be nothing: the caller must already have dropped its own references."""
    return live_distributed_objects()  # it collects first


def done_marker(out: Path, rank: int) -> Path:
    """Where rank ``rank`` records that it passed the final barrier."""
    return Path(f"{out}.rank{rank}.done")


@contextlib.contextmanager
def sigterm_held() -> Iterator[None]:
    """Hold SIGTERM (torchrun's "stop" to the other ranks when one exits badly) while the
    final barrier and the marker are written, so a rank that finished always records it;
    a SIGTERM that came meanwhile is raised again as soon as this block ends.

    A Python handler, not a signal mask: by now gloo and OpenMP have threads, and a masked
    signal would go to one of them and end the process anyway. Python runs its handlers in
    the main thread, after the barrier's C call returns."""
    came: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if came:
            signal.raise_signal(signal.SIGTERM)


def mark_done(out: Path, rank: int, leftover: list[str]) -> None:
    """Write this rank's marker: it finished every cell and passed the final barrier."""
    done_marker(out, rank).write_text(json.dumps({"rank": rank, "leftover": leftover}) + "\n")
