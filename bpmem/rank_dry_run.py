"""Each rank's peak of a distributed step, predicted by a dry run of that rank alone.

For FSDP and tensor parallelism the arithmetic gives each rank's parameters, gradients,
optimizer state and retained activations, but not the moment-by-moment peak: the
all-gathered parameters, the reduce-scattered gradients and the DTensor redistributions
come and go inside the library. So ``rank_peaks`` runs each rank's share of the step in this
process, one rank after another, in a process group whose collectives return without
communicating (``bpmem.torch_private.fake_process_group``): the same shards, buffers and
order of allocations, on one rank's memory, with no torchrun and no network. The live probe
watches the third step, as the worker does on every rank of the real run.

Not for pipelines: their stages learn their input shapes from the previous stage over the
process group, which a fake one cannot tell them; nor for FSDP with uneven shards (a width
that the world size does not divide), whose padding follows sizes the ranks exchange. Not for
DDP either, whose peak the arithmetic predicts (one device's step at B/p plus the buckets).
"""

from __future__ import annotations

import contextlib
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


def rank_peaks(spec: Any, step: Any) -> list[int]:
    """``peak_bytes`` of every rank of ``step`` (a split strategy whose ``peak_by_dry_run``
    is set), in rank order, each as the worker measures it: the live peak of one steady-state
    step plus the wrapper's lifelong buffers."""
    import torch
    from torch import nn

    from bpmem.step import _unlabelled, make_optimizer
    from bpmem.strategies.rank_runtime import live_step
    from bpmem.torch_private import fake_process_group

    peaks = []
    for rank in range(step.world_size):
        with fake_process_group(rank, step.world_size), _as_value_error(rank):
            setup = step.strategy.setup_rank(spec, step, rank, torch.device("cpu"))
            optimizer = make_optimizer(step, nn.ModuleList(setup.modules))
            for _ in range(2):  # the worker's first two steps: optimizer state, then steady state
                optimizer.zero_grad(set_to_none=True)
                setup.run(_unlabelled)
                optimizer.step()
            live = live_step(setup, optimizer, setup.transient_params())
            peaks.append(live.peak_bytes + setup.buffer_bytes())
            del setup, optimizer, live
    return peaks
