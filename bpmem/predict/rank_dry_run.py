"""Each rank's peak of a distributed step, predicted by a dry run of that rank alone.

For FSDP, tensor parallelism and the pipelines the arithmetic gives each rank's parameters, gradients,
optimizer state and retained activations, but not the moment-by-moment peak: the
all-gathered parameters, the reduce-scattered gradients and the DTensor redistributions
come and go inside the library. So ``rank_peaks`` runs each rank's share of the step in this
process, one rank after another, in a process group whose collectives return without
communicating (``bpmem.torch_private.fake_process_group``): the same shards, buffers and
order of allocations, on one rank's memory, with no torchrun and no network. The live probe
watches the third step, as the worker does on every rank of the real run.

What a rank would learn from the others it is told instead (``setup_dry_rank``): a pipeline
stage its micro-batch's input and output shapes, which under torchrun it receives from its
neighbour on the first step; and a send keeps its tensor until its work is dropped, as a real
backend's does (``p2p_works_hold_their_tensors``). Not for FSDP with uneven shards (a
width that the world size does not divide), whose padding follows sizes the ranks exchange;
not for DDP either, whose peak the arithmetic predicts (one device's step at B/p plus the
buckets).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def _as_value_error(rank: int) -> Iterator[None]:
    """A step that needs what a real collective would have sent fails here: say so in one line."""
    try:
        yield
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"strategy: the dry run of rank {rank} needs data a real collective sends ({first}); "
                         "allowed: measure it under torchrun") from None


class _HoldingWork:
    """A point-to-point ``Work`` that keeps its tensor alive for as long as it lives itself, as
    gloo's and NCCL's do; everything else is the wrapped work's."""

    def __init__(self, work: Any, tensor: Any) -> None:
        self._work, self._tensor = work, tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


@contextlib.contextmanager
def p2p_works_hold_their_tensors() -> Iterator[None]:
    """The fake backend's send and receive works drop their tensor at once; a real backend's
    hold it until the work itself is dropped, which a pipeline schedule does only once it has
    waited on it (sends, for the interleaved schedule, at the end of the step). So a tensor
    sent would die earlier in a dry run than under torchrun. Inside the block, ``isend`` and
    ``irecv`` (both names the library looks up: ``torch.distributed`` and its
    ``distributed_c10d``) return works that hold their tensor."""


    def holding(function: Any) -> Any:
        @functools.wraps(function)
        def call(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            work = function(tensor, *args, **kwargs)
            return None if work is None else _HoldingWork(work, tensor)

        return call

    with _distributed_functions_wrapped(("isend", "irecv"), holding):
        yield


# the collectives FSDP and tensor parallelism issue, under the names torch has had for them
_COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
                "all_reduce")


@contextlib.contextmanager
def collectives_release_late() -> Iterator[None]:
    """Each collective's tensors live until the next collective starts.

    Under gloo a collective runs on the backend's own thread, which drops its reference to
    the work (and so to its tensors) a moment after ``wait()`` returns. Whether that comes
    before or after the main thread's next allocation is a race: FSDP's all-gather buffer of
    one unit is then freed before or after the next unit's is made. Run after run, a rank's
    measured peak is one or the other. This block gives the late one; without it, the early."""
    held: list[Any] = []

    def holding(function: Any) -> Any:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            held.clear()  # the last collective's thread has let go by the time this one starts
            held.extend(a for a in (*args, *kwargs.values()) if hasattr(a, "untyped_storage"))
            return function(*args, **kwargs)

        return call

    try:
        with _distributed_functions_wrapped(_COLLECTIVES, holding):
            yield
    finally:
        held.clear()


@contextlib.contextmanager
def _distributed_functions_wrapped(names: tuple[str, ...], wrap: Any) -> Iterator[None]:
    """Inside the block, each of ``torch.distributed``'s functions ``names`` (those this torch
    has) is ``wrap(function)``, under both names the libraries look it up by:
    ``torch.distributed`` and its ``distributed_c10d``."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    originals = {name: getattr(distributed_c10d, name) for name in names if hasattr(distributed_c10d, name)}
    for name, function in originals.items():
        setattr(distributed_c10d, name, wrap(function))
        setattr(dist, name, getattr(distributed_c10d, name))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(distributed_c10d, name, function)
            setattr(dist, name, function)


def rank_peaks(spec: Any, step: Any, release_late: bool = False) -> list[int]:
    """``peak_bytes`` of every rank of ``step`` (a split strategy whose ``peak_by_dry_run``
    is set), in rank order, each as the worker measures it: the live peak of one steady-state
    step plus the wrapper's lifelong buffers. With ``release_late``, as it measures it when
    gloo's thread lets go of every collective's tensors only after the next one has begun
    (``collectives_release_late``)."""
    import torch
    from torch import nn

    from bpmem.measurement.step import _unlabelled, make_optimizer
    from bpmem.strategies.rank_runtime import live_step
    from bpmem.torch_private import fake_process_group

    peaks = []
    for rank in range(step.world_size):
        with fake_process_group(rank, step.world_size), p2p_works_hold_their_tensors(), _as_value_error(rank), \
                collectives_release_late() if release_late else contextlib.nullcontext():
            setup = step.strategy.setup_dry_rank(spec, step, rank, torch.device("cpu"))
            optimizer = make_optimizer(step, nn.ModuleList(setup.modules))
            for _ in range(2):  # the worker's first two steps: optimizer state, then steady state
                optimizer.zero_grad(set_to_none=True)
                setup.run(_unlabelled)
                optimizer.step()
            live = live_step(setup, optimizer, setup.transient_params())
            peaks.append(live.peak_bytes + setup.buffer_bytes())
            del setup, optimizer, live
    return peaks
