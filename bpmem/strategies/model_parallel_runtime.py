"""The runtime of ``model-parallel``: the forward over devices, the placement of each stage,
and the measurement of each stage's figures (``bpmem.strategies.model_parallel`` holds the
strategy's config and prediction)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bpmem.analytic.schedules import stage_of_label, stage_ranges
from bpmem.figures import MeasuredRank
from bpmem.models.mlp import as_workload, units
from bpmem.strategies.placement import DEVICES, Machine, Placement, place

if TYPE_CHECKING:
    from bpmem.spec import MLPSpec, StepSpec


def stage_devices(device: str, world_size: int, placement: Placement | None = None) -> tuple[torch.device, ...]:
    """The device of each stage, as ``bpmem.strategies.placement.place`` puts them on this machine (or
    as ``placement`` already says); raises ValueError with its reason when the cell cannot
    run here (a CUDA cell asking for more GPUs than this process sees)."""
    placement = placement or place(device, world_size, DEVICES, Machine.here())
    if not placement.runs:
        raise ValueError(f"world_size: {placement.skipped}")
    return tuple(torch.device(name) for name in placement.devices)


@dataclass(frozen=True)
class ModelParallelStrategy:
    """The forward of a model whose stages were placed with ``place``: each stage runs on
    its own device, its input first copied there."""

    devices: tuple[torch.device, ...]
    ranges: tuple[tuple[int, int], ...]
    blocks: Callable[[nn.Module], list[list[nn.Module]]] = units  # the workload's chain
    name: str = "model-parallel"

    def forward(self, model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        chain = self.blocks(model)
        for device, (start, end) in zip(self.devices, self.ranges, strict=True):
            x = x.to(device)  # a no-op where the device is the same
            for unit in chain[start:end]:
                for module in unit:
                    x = module(x)
        return x

    def params(self) -> dict[str, Any]:
        return {"world_size": len(self.devices)}

    def place(self, model: nn.Sequential) -> None:
        """Move each stage's modules to its device (the Parameter objects stay the same)."""
        chain = self.blocks(model)
        for device, (start, end) in zip(self.devices, self.ranges, strict=True):
            for unit in chain[start:end]:
                for module in unit:
                    module.to(device)

    def stage_parameters(self, model: nn.Sequential) -> list[list[nn.Parameter]]:
        chain = self.blocks(model)
        return [[p for unit in chain[start:end] for module in unit for p in module.parameters()]
                for start, end in self.ranges]


def measure_stages(spec: MLPSpec, step: StepSpec, device: str, warmup: int, repeats: int,
                   placement: Placement | None = None) -> list[MeasuredRank]:
    """One row of measured figures per stage: parameters, gradients and optimizer state of
    its parameters; the activations its modules save; the peak of its device (on the first
    stage placed there; a device shared by several stages has one peak); the step time; and
    the largest relative gradient error against the whole model on one device."""
    from bpmem.measurement.cell import optimizer_state_tensors
    from bpmem.measurement.step import forward_objective, make_optimizer, train_step
    from bpmem.measurement.timing import time_calls, time_summary
    from bpmem.probes import LiveTensorProbe, SavedTensorProbe, distinct_storage_bytes
    from bpmem.strategies.rank_runtime import max_relative_error, reference_gradients

    step.strategy.check(spec, step)
    devices = stage_devices(device, step.world_size, placement)
    workload = as_workload(spec)
    strategy = ModelParallelStrategy(devices, stage_ranges(spec, step.world_size), workload.blocks)
    model = workload.build(devices[0], seed=0)
    strategy.place(model)
    x, y = workload.make_batch(step.batch_size, devices[0], seed=0)
    y = y.to(devices[-1])
    optimizer = make_optimizer(step, model)

    optimizer.zero_grad(set_to_none=True)
    forward_objective(spec, model, x, y, strategy=strategy).backward()
    reference = reference_gradients(spec, step, devices[0])
    error = max_relative_error([p.grad.to(devices[0]) for p in model.parameters()], reference)
    del reference
    optimizer.step()  # the warm-up: optimizer state now exists

    saved = SavedTensorProbe(model)
    with saved:
        train_step(spec, model, optimizer, x, y, scope=saved.scope, strategy=strategy)
    saved_by_stage = [0] * step.world_size
    for row in saved.per_layer():
        saved_by_stage[stage_of_label(row["name"], strategy.ranges)] += row["saved_bytes"]

    peaks: dict[torch.device, tuple[int, str]] = {}
    for stage_device in dict.fromkeys(devices):
        params = list(model.parameters())
        live = LiveTensorProbe({"params": params, "grads": [p.grad for p in params],
                                "optimizer": optimizer_state_tensors(optimizer), "inputs": [x, y]},
                               record_timeline=False, device=stage_device)
        with live:
            train_step(spec, model, optimizer, x, y, phase=live.phase, strategy=strategy)
        peaks[stage_device] = (live.peak_bytes, live.peak_phase)

    times = time_calls(lambda: train_step(spec, model, optimizer, x, y, strategy=strategy), warmup, repeats,
                       devices)
    rows = []
    for k, stage_params in enumerate(strategy.stage_parameters(model)):
        first_on_device = devices.index(devices[k]) == k
        state = [v for p in stage_params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        peak, phase = peaks[devices[k]] if first_on_device else (None, "")
        rows.append(MeasuredRank(
            rank=k, device=str(devices[k]), params_bytes=distinct_storage_bytes(stage_params),
            grads_bytes=distinct_storage_bytes(p.grad for p in stage_params),
            optimizer_bytes=distinct_storage_bytes(state),
            saved_activation_bytes=saved_by_stage[k], saved_hook_bytes=saved_by_stage[k],
            peak_bytes=peak, peak_phase=phase, **time_summary(times), equivalence_max_rel_err=error,
            threads=torch.get_num_threads(),
        ))
    return rows

