"""``model-parallel``: one process, the MLP's layers spread over N devices (the seed's
exercise 5 in its plainest form, with no pipelining and no second process).

Stage k of N = ``world_size`` holds a contiguous run of units (Linear + activation), split
as evenly as the chain allows (the same split as the pipelines), on device k. The forward
hands the activation to the next device at each stage boundary with ``.to(device)``: a copy,
whose backward node saves nothing, but which the receiving Linear saves for its weight
gradient. X lives on the first device, y and the loss on the last; each weight's square sum
for s is taken on its own device and moved to the last (``bpmem.model.regularizer``).

What it buys: each device holds its stage's parameters, gradients, optimizer state and
retained activations only. What it costs: only one device computes at a time, so each
one idles (N - 1) / N of the step (the pipeline bubble with one micro-batch), and every
boundary crosses between devices twice (activation forward, its gradient backward).

Devices: ``cuda:0`` .. ``cuda:N-1`` when the cell's device is CUDA; the process must see at
least N GPUs. On CPU every stage lands on the one CPU device: nothing is split physically,
and the boundary copies are no-ops, but each stage's figures are still measured one stage
at a time (parameters, gradients, optimizer state and the activations its modules save),
which is what proves this code path and its predictions on machines without GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bpmem.model import build, make_batch
from bpmem.spec import MLPSpec, StepSpec
from bpmem.strategies.checkpointing import chain_costs, units
from bpmem.strategies.schedules import even_stages


def stage_ranges(spec: MLPSpec, world_size: int) -> tuple[tuple[int, int], ...]:
    """[start, end) unit ranges of the N stages, split as the pipelines split."""
    return tuple(even_stages(spec, world_size))


def stage_devices(device: str, world_size: int) -> tuple[torch.device, ...]:
    """The device of each stage; raises ValueError (naming ``world_size``) when a CUDA cell
    asks for more GPUs than this process sees."""
    kind = torch.device(device).type
    if kind != "cuda":
        return (torch.device(kind),) * world_size
    visible = torch.cuda.device_count()
    if visible < world_size:
        raise ValueError(f"world_size: model-parallel on {world_size} GPUs needs {world_size} visible to one "
                         f"process; this one sees {visible}; allowed: world_size <= {visible}")
    return tuple(torch.device("cuda", index) for index in range(world_size))


def check(spec: MLPSpec, step: StepSpec) -> None:
    """Raise ValueError for a cell the split cannot run, naming the field."""
    if spec.depth + 1 < step.world_size:
        raise ValueError(f"depth: {spec.depth} gives {spec.depth + 1} units, fewer than the {step.world_size} "
                         f"devices of model-parallel; allowed: depth >= {step.world_size - 1}")


@dataclass(frozen=True)
class ModelParallelStrategy:
    """The forward of a model whose stages were placed with ``place``: each stage runs on
    its own device, its input first copied there."""

    devices: tuple[torch.device, ...]
    ranges: tuple[tuple[int, int], ...]
    name: str = "model-parallel"

    def forward(self, model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        chain = units(model)
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
        chain = units(model)
        for device, (start, end) in zip(self.devices, self.ranges, strict=True):
            for unit in chain[start:end]:
                for module in unit:
                    module.to(device)

    def stage_parameters(self, model: nn.Sequential) -> list[list[nn.Parameter]]:
        chain = units(model)
        return [[p for unit in chain[start:end] for module in unit for p in module.parameters()]
                for start, end in self.ranges]


def _stage_of_label(label: str, ranges: tuple[tuple[int, int], ...]) -> int:
    """Which stage a SavedTensorProbe label belongs to: "4.Linear" is module 4, unit 2;
    the loss, s and anything outside a module run on the last device."""
    head = label.split(".", 1)[0]
    if not head.isdigit():
        return len(ranges) - 1
    unit = int(head) // 2
    return next(k for k, (start, end) in enumerate(ranges) if start <= unit < end)


def predict_stages(spec: MLPSpec, step: StepSpec, separate_devices: bool) -> list[dict[str, Any]]:
    """Per-stage predictions, every figure exact; the peak only where every stage shares
    one device (then it is the plain step's, exact).

    Retained activations are the plain step's, each saved tensor attributed to the module
    that saves it first (``bpmem.estimate.saved_per_layer``) and so to that module's stage;
    the loss's to the last. On separate devices a stage k > 0 also keeps the copy of its
    input, which its first Linear saves, unless the previous activation saved nothing of
    its own output (GELU saves its input): then that Linear's input was already its own in
    the plain attribution. Traffic: each boundary's activation forward and its gradient
    backward. Bubble: (N - 1) / N, one device busy at a time.
    """
    from bpmem.estimate import saved_per_layer
    from bpmem.strategies.distributed_predict import units_state_bytes

    ranges = stage_ranges(spec, step.world_size)
    costs = chain_costs(spec, step.batch_size)
    saved = [0] * len(ranges)
    for row in saved_per_layer(spec, step.batch_size):
        saved[_stage_of_label(row["name"], ranges)] += row["saved_bytes"]
    stages = []
    for k, (start, end) in enumerate(ranges):
        copy = costs.boundary_bytes[start] if k > 0 and separate_devices and spec.activation != "gelu" else 0
        stages.append({
            **units_state_bytes(spec, step, [(start, end)]),
            "saved_activation_bytes": saved[k] + copy, "textbook_saved_bytes": saved[k] + copy,
            "bubble_fraction": (len(ranges) - 1) / len(ranges),
            "comm_bytes": 2 * (costs.boundary_bytes[start] if k > 0 else 0)
                          + 2 * (costs.boundary_bytes[end] if end < len(costs.boundary_bytes) else 0),
        })
    if not separate_devices:
        # one device runs the plain step's very operations: its peak is the plain step's,
        # reported on the first stage's row like the measurement
        from dataclasses import replace

        from bpmem.estimate import estimate

        stages[0]["peak_bytes"] = estimate(spec, replace(step, strategy="none", world_size=1)).peak_bytes
    return stages


def measure_stages(spec: MLPSpec, step: StepSpec, device: str, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """One row of measured figures per stage: parameters, gradients and optimizer state of
    its parameters; the activations its modules save; the peak of its device (on the first
    stage placed there; a device shared by several stages has one peak); the step time; and
    the largest relative gradient error against the whole model on one device."""
    from bpmem.measure_cell import optimizer_state_tensors, time_calls, time_summary
    from bpmem.probes import LiveTensorProbe, SavedTensorProbe, distinct_storage_bytes
    from bpmem.step import forward_objective, make_optimizer, train_step
    from bpmem.strategies.distributed import max_relative_error, reference_gradients

    check(spec, step)
    devices = stage_devices(device, step.world_size)
    strategy = ModelParallelStrategy(devices, stage_ranges(spec, step.world_size))
    model = build(spec, devices[0], seed=0)
    strategy.place(model)
    x, y = make_batch(spec, step.batch_size, devices[0], seed=0)
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
        saved_by_stage[_stage_of_label(row["name"], strategy.ranges)] += row["saved_bytes"]

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
        rows.append({
            "rank": k, "device": str(devices[k]),
            "params_bytes": distinct_storage_bytes(stage_params),
            "grads_bytes": distinct_storage_bytes(p.grad for p in stage_params),
            "optimizer_bytes": distinct_storage_bytes(state),
            "saved_activation_bytes": saved_by_stage[k], "saved_hook_bytes": saved_by_stage[k],
            "peak_bytes": peak, "peak_phase": phase,
            **time_summary(times), "equivalence_max_rel_err": error,
        })
    return rows

