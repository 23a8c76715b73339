"""One rank's dry run, in a process group that does not communicate (bpmem.predict.rank_dry_run): the
pieces it adds to PyTorch's fake backend, checked in this process without torchrun. That the
dry run's peaks equal torchrun's is checked in tests/test_distributed.py (slow)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from bpmem.predict.rank_dry_run import p2p_works_hold_their_tensors, rank_peaks
from bpmem.spec import MLPSpec
from bpmem.strategies.registry import make_step
from bpmem.torch_private import fake_process_group


def _sent_tensor_outlives_the_send(hold: bool) -> tuple[bool, bool]:
    """(alive while the work is, alive after the work is dropped) for one isend's tensor."""
    import contextlib

    import torch.distributed as dist

    with fake_process_group(0, 2), (p2p_works_hold_their_tensors() if hold else contextlib.nullcontext()):
        sent = torch.ones(16)
        gone = weakref.ref(sent.untyped_storage())
        work = dist.isend(sent, dst=1)
        del sent
        gc.collect()
        while_waiting = gone() is not None
        work.wait()
        del work
        gc.collect()
        return while_waiting, gone() is not None


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_a_send_keeps_its_tensor_until_its_work_is_dropped_as_gloo_does() -> None:
    """The fake backend lets a sent tensor go at once; the schedule keeps the work (and under
    gloo, the tensor) until it has waited on it, at the end of the step for the interleaved one."""
    assert _sent_tensor_outlives_the_send(hold=False) == (False, False)  # why the wrapper exists
    assert _sent_tensor_outlives_the_send(hold=True) == (True, False)


def test_the_wrapper_leaves_torch_distributed_as_it_found_it() -> None:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    before = dist.isend, dist.irecv, distributed_c10d.isend, distributed_c10d.irecv
    with fake_process_group(0, 2), p2p_works_hold_their_tensors():
        assert dist.isend is distributed_c10d.isend and dist.isend is not before[0]
    assert (dist.isend, dist.irecv, distributed_c10d.isend, distributed_c10d.irecv) == before


@pytest.mark.parametrize("strategy", ["pipeline-gpipe", "pipeline-1f1b", "pipeline-interleaved"])
def test_every_pipeline_rank_runs_alone_with_its_shapes_given(strategy: str) -> None:
    """Without the shapes up front a later stage would wait on its neighbour's metadata, which
    a fake group never sends. The last stage holds fewer weights and no batch: the smaller peak."""
    spec = MLPSpec(input_dim=32, hidden_dim=16, output_dim=4, depth=5)
    peaks = rank_peaks(spec, make_step(batch_size=16, strategy=strategy, microbatches=4, world_size=2))
    assert len(peaks) == 2 and peaks[0] > peaks[1] > 0
