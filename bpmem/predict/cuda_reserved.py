"""``predicted_cuda_reserved_bytes``: what the CUDA caching allocator reserves for a cell, before it runs.

The dry run (fake tensors, with the device's storage sizes) gives the cell's allocations in
the order a fresh process makes them: the cuBLAS workspace (``CUBLAS_WORKSPACE_BYTES``, the
profile's: one block at the first matmul), the parameters and buffers as the model is built, the batch,
then the warm-up step (gradients and optimizer state appear in it) and the steps after. Each
allocation and free goes through the model of the caching allocator
(``bpmem.cuda_allocator``); the figure is the most it reserved, which is what
``max_memory_reserved`` reads for the row (reserved memory only grows while nothing calls
``empty_cache``). Beside it, ``step_allocated_bytes`` is the most allocated in whole blocks
during the last step, less the workspace: ``cuda_step_allocated_bytes``'s twin, which a sweep
writes as ``predicted_cuda_allocated_bytes`` for its CUDA train rows.

Where CUDA is not here, the dry run takes the CPU's kernels, as ``predicted_cuda_allocated``
does, with the differences ``bpmem.predict.cuda_profile`` says are modelled put right here:
torch.optim's step counters, which CUDA keeps in host memory unless the optimizer is fused,
are left out of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bpmem.predict.cuda_profile import TORCH_2_11_CUDA_13
from bpmem.spec import MLPSpec, StepSpec

CUBLAS_WORKSPACE_BYTES = TORCH_2_11_CUDA_13.cublas_workspace_bytes  # the one profile measured so far
STEADY_STEPS = 1  # steps after the warm-up: the cache stops growing after the first of them


@dataclass(frozen=True)
class CudaAllocatorPrediction:
    """The caching allocator's figures for one cell, from the dry run's allocations."""

    reserved_bytes: int  # max reserved over the process, workspace included
    allocated_bytes: int  # max allocated during the last step, in whole blocks, workspace included
    segments: int  # at the end
    events: int  # allocations and frees replayed

    @property
    def step_allocated_bytes(self) -> int:
        """``cuda_step_allocated_bytes``'s twin: the last step's most allocated, less the workspace."""
        return self.allocated_bytes - CUBLAS_WORKSPACE_BYTES


def allocation_stream(spec: MLPSpec | Any, step: StepSpec, device: str = "cuda") -> list[tuple[str, int, int]]:
    """``("alloc" | "free", key, bytes)`` in a fresh process's order, for ``STEADY_STEPS`` steps
    after the warm-up (inference: forwards)."""
    from bpmem.measurement.fake_kernels import DeviceStorageSizes
    from bpmem.measurement.precision import precision_for
    from bpmem.measurement.step import inference_step, make_optimizer, train_step
    from bpmem.models.batch import batch_tensors
    from bpmem.models.mlp import as_workload
    from bpmem.predict.dry_run import dry_run_device
    from bpmem.probes import LiveTensorProbe
    from bpmem.torch_private import fake_tensor_mode

    where = dry_run_device(device, step)
    workload = as_workload(spec)
    stream: list[tuple[str, int, int]] = [("alloc", -1, CUBLAS_WORKSPACE_BYTES)]
    with fake_tensor_mode(), DeviceStorageSizes():
        model = workload.build(where, seed=0)
        x, y = workload.make_batch(step.batch_size, where, seed=0)
        batch = batch_tensors(x, y)
        optimizer = make_optimizer(step, model) if step.mode != "inference" else None
        strategy = step.strategy.runtime(spec, step) if step.mode != "inference" else None
        precision = precision_for(step.amp, where)
        resident = {"params": list(model.parameters()), "buffers": list(model.buffers()), "inputs": batch}
        # the probe's ledger opens with the resident storages, in this order, as the model and batch made them
        probe = LiveTensorProbe(resident, record_timeline=False, hook_graphs=step.mode != "inference")
        probe.ledger.allocations = []
        del resident
        marks = []  # where each step's allocations begin
        with probe:  # one probe over every step, so that what a step frees after it returns is seen too
            for _ in range(1 + STEADY_STEPS):
                marks.append(len(probe.ledger.allocations))
                if optimizer is None:
                    inference_step(model, x, workload=workload, precision=precision)
                else:
                    train_step(workload, model, optimizer, x, y, strategy=strategy)
        on_the_host = _host_counters(optimizer, step) if where == "cpu" and device.startswith("cuda") else set()
        live_at_end = _live_at_end(probe.ledger.allocations)
        for index, entry in enumerate(probe.ledger.allocations):
            if index in marks:
                stream.append(("step", 0, 0))
            if entry.key in on_the_host and live_at_end.get(entry.key) == index:
                continue  # a step counter that CUDA keeps in host memory, outside the caching allocator
            stream.append((entry.action, entry.key, entry.nbytes))
    return stream


def _host_counters(optimizer: Any, step: StepSpec) -> set[int]:
    """The storages of the optimizer's step counters where CUDA keeps them on the host: torch.optim
    makes ``state["step"]`` a CPU tensor unless the implementation is fused (or capturable), so
    a dry run on the CPU must not give them to the CUDA allocator (512 B each)."""
    from bpmem.torch_private import storage_address

    if optimizer is None or step.resolved_impl("cuda") == "fused":
        return set()
    return {storage_address(value.untyped_storage()) for state in optimizer.state.values()
            for name, value in state.items() if name == "step" and hasattr(value, "untyped_storage")}


def _live_at_end(allocations: list[Any]) -> dict[int, int]:
    """key -> the index of the allocation of each storage still live after the last step."""
    live: dict[int, int] = {}
    for index, entry in enumerate(allocations):
        if entry.action == "alloc":
            live[entry.key] = index
        else:
            live.pop(entry.key, None)
    return live


def predict_cuda_allocator(spec: MLPSpec | Any, step: StepSpec, device: str = "cuda",
                           alloc_conf: str = "") -> CudaAllocatorPrediction:
    """The dry run's allocations through the caching allocator model."""
    from bpmem.cuda_allocator.config import AllocatorConfig
    from bpmem.cuda_allocator.model import CachingAllocator

    allocator = CachingAllocator(AllocatorConfig.parse(alloc_conf))
    where: dict[int, int] = {}
    events = 0
    for action, key, nbytes in allocation_stream(spec, step, device):
        if action == "step":
            allocator.stats.max_allocated = allocator.stats.allocated  # peaks from here on are this step's
            continue
        events += 1
        if action == "alloc":
            where[key] = allocator.malloc(max(nbytes, 1))
        elif key in where:
            allocator.free(where.pop(key))
    stats = allocator.stats
    return CudaAllocatorPrediction(stats.max_reserved, stats.max_allocated, stats.segments, events)
