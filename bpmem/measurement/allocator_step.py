"""The allocator's figures of one cell: ``allocator_peak_bytes`` and ``scratch_bytes``.

On the CPU, after the cell's other steps (``bpmem.measurement.cell``), this module runs:

1. a step under a bare profiler, which is discarded: the CPU allocator's trace reports the
   free of a block only if a profiled run made it, and a training step frees the last
   step's gradients, so those must be made under a profiler first;
2. a step under ``AllocatorTraceProbe`` alone: ``allocator_peak_bytes``, the allocator's most,
   each block as 64 B multiples, over the resident storages as blocks (parameters, buffers,
   gradients, optimizer state, the batch). No dispatch mode runs, so nothing is perturbed;
3. a step under ``AllocatorViewProbe``: op by op, the allocator's most against the live
   tensors' blocks; ``scratch_bytes`` is the peak there less the tensors' blocks at that op.

On CUDA, ``allocator_peak_bytes`` is ``cuda_step_allocated_bytes`` and ``scratch_bytes`` is that
less ``peak_bytes`` (its 512 B rounding included: no op-by-op trace is taken there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bpmem.models.batch import batch_tensors, input_tensors
from bpmem.probes import AllocatorTraceProbe
from bpmem.probes.allocator import allocator_profile
from bpmem.probes.allocator_view import CPU_BLOCK_BYTES, AllocatorView, AllocatorViewProbe, blocks


def resident_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     batch: list[torch.Tensor]) -> dict[str, list[torch.Tensor | None]]:
    """What is live before a step and stays: a live probe's ``preexisting``."""
    params = list(model.parameters())
    out: dict[str, list[torch.Tensor | None]] = {"params": list(params), "buffers": list(model.buffers()),
                                                  "inputs": list(batch)}
    if optimizer is not None:
        out["grads"] = [p.grad for p in params]
        out["optimizer"] = [v for state in optimizer.state.values() for v in state.values()
                            if isinstance(v, torch.Tensor)]
    return out


def resident_blocks(resident: dict[str, list[torch.Tensor | None]]) -> int:
    """The resident storages, each once, as the CPU allocator's 64 B blocks."""
    seen: dict[int, int] = {}
    for tensors in resident.values():
        for tensor in tensors:
            if tensor is not None and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                seen.setdefault(storage.data_ptr(), blocks(storage.nbytes(), CPU_BLOCK_BYTES))
    return sum(seen.values())


def cpu_allocator_figures(run_step: Callable[[Any], Any], resident: Callable[[], dict[str, Any]],
                          hook_graphs: bool = True) -> dict[str, int]:
    """``allocator_peak_bytes`` and ``scratch_bytes`` of the step ``run_step(phase)`` runs
    (``resident()`` gives what is live before it, read afresh before each run; ``hook_graphs``
    False for an inference forward, as in ``measure_inference_peak``)."""
    with allocator_profile(quiet_inside=True):
        run_step(None)  # the blocks the measured steps free are now ones a profiled run made
    trace = AllocatorTraceProbe(resident_blocks(resident()), granularity=CPU_BLOCK_BYTES)
    with trace:
        run_step(None)
    view = allocator_view(run_step, resident, hook_graphs=hook_graphs)
    return {"allocator_peak_bytes": trace.peak_bytes,
            "scratch_bytes": max(0, trace.peak_bytes - (view.allocator_peak_bytes - view.scratch_bytes))}


def allocator_view(run_step: Callable[[Any], Any], resident: Callable[[], dict[str, Any]],
                   trace: bool = True, hook_graphs: bool = True) -> AllocatorView:
    """The step op by op under ``AllocatorViewProbe`` (``trace=False``: tensors' blocks only).

    ``resident`` is a callable so that no frame here holds the resident tensors during the
    step: a held reference to last step's gradients would keep them alive past ``zero_grad``."""
    probe = AllocatorViewProbe(resident(), trace=trace, hook_graphs=hook_graphs)
    with probe:
        run_step(probe.phase)
    assert probe.view is not None
    return probe.view


def step_view(spec: Any, step: Any, device: str = "cpu", fake: bool = False, seed: int = 0) -> AllocatorView:
    """One cell's step at ``step.batch_size``, op by op, as ``bpmem measure`` would run it (the
    same model, batch, optimizer and warm-up): real, under the allocator's trace; or with
    ``fake``, on fake tensors, the tensors' blocks alone (a dry run)."""
    import contextlib

    from bpmem.measurement.fake_kernels import DeviceStorageSizes
    from bpmem.measurement.fast_paths import dense_encoders
    from bpmem.measurement.precision import precision_for, settle
    from bpmem.measurement.step import inference_step, make_optimizer, train_step
    from bpmem.models.mlp import as_workload
    from bpmem.torch_private import fake_tensor_mode

    workload = as_workload(spec)
    with fake_tensor_mode() if fake else contextlib.nullcontext(), DeviceStorageSizes() if fake \
            else contextlib.nullcontext():
        model = workload.build(device, seed=seed)
        x, y = workload.make_batch(step.batch_size, device, seed=seed)
        batch = batch_tensors(x, y)
        if step.mode == "inference":
            precision = precision_for(step.amp, device)

            def run(phase: Any) -> Any:
                return inference_step(model, x, phase or _unlabelled, workload, precision)
            optimizer = None
            inputs = input_tensors(x)
        else:
            optimizer = make_optimizer(step, model)
            strategy = step.strategy.runtime(spec, step)

            def run(phase: Any) -> Any:
                return train_step(workload, model, optimizer, x, y, phase=phase or _unlabelled, strategy=strategy)
            settle(lambda: run(None), optimizer)
            inputs = batch
        if not fake:
            with allocator_profile(quiet_inside=True):
                run(None)  # frees in the measured step are then of blocks a profiled run made
        del batch
        with dense_encoders(model):  # as measure_inference_peak's dry run
            return allocator_view(run, lambda: resident_tensors(model, optimizer, inputs), trace=not fake,
                                  hook_graphs=step.mode != "inference")  # as measure_inference_peak


def _unlabelled(name: str) -> Any:
    import contextlib

    return contextlib.nullcontext()
