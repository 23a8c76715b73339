"""``model-parallel``: one process, the MLP's layers spread over N devices (the seed's
exercise 5 in its plainest form, with no pipelining and no second process).

Stage k of N = ``world_size`` holds a contiguous run of units (Linear + activation), split
as evenly as the chain allows (the same split as the pipelines), on device k. The forward
hands the activation to the next device at each stage boundary with ``.to(device)``: a copy,
whose backward node saves nothing, but which the receiving Linear saves for its weight
gradient. X lives on the first device, y and the loss on the last; each weight's square sum
for s is taken on its own device and moved to the last (``bpmem.models.mlp.regularizer``).

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

import dataclasses
from typing import TYPE_CHECKING, Any

from bpmem.analytic.plain_step import plain_estimate
from bpmem.analytic.rules import chain_costs, saved_per_layer, units_state_bytes
from bpmem.analytic.schedules import stage_of_label, stage_ranges
from bpmem.figures import RankFigures
from bpmem.strategies.base import DEVICES, SplitConfig, strategy

if TYPE_CHECKING:
    from bpmem.spec import MLPSpec, StepSpec


@strategy("model-parallel", "one process, the layers spread over N devices (cuda:0..N-1), no pipelining",
          placement=DEVICES, mlp_only="its units, one run per device")
class ModelParallel(SplitConfig):
    def check(self, spec: MLPSpec, step: StepSpec) -> None:
        self.check_model(spec)
        if spec.depth + 1 < self.world_size:
            raise ValueError(f"depth: {spec.depth} gives {spec.depth + 1} units, fewer than the {self.world_size} "
                             f"devices of model-parallel; allowed: depth >= {self.world_size - 1}")

    def predict_ranks(self, spec: MLPSpec, step: StepSpec) -> list[RankFigures]:
        return self.predict_stages(spec, step, separate_devices=True)

    def predict_stages(self, spec: MLPSpec, step: StepSpec, separate_devices: bool) -> list[RankFigures]:
        """Per-stage predictions, every figure exact; the peak only where every stage shares
        one device (then it is the plain step's, exact).

        Retained activations are the plain step's, each saved tensor attributed to the module
        that saves it first (``bpmem.analytic.rules.saved_per_layer``) and so to that module's stage;
        the loss's to the last. On separate devices a stage k > 0 also keeps the copy of its
        input, which its first Linear saves, unless the previous activation saved nothing of
        its own output (GELU saves its input): then that Linear's input was already its own in
        the plain attribution. Traffic: each boundary's activation forward and its gradient
        backward. Bubble: (N - 1) / N, one device busy at a time.
        """
        ranges = stage_ranges(spec, self.world_size)
        costs = chain_costs(spec, step.batch_size)
        saved = [0] * len(ranges)
        for row in saved_per_layer(spec, step.batch_size):
            saved[stage_of_label(row["name"], ranges)] += row["saved_bytes"]
        stages = []
        for k, (start, end) in enumerate(ranges):
            copy = costs.boundary_bytes[start] if k > 0 and separate_devices and spec.activation != "gelu" else 0
            stages.append(RankFigures(
                **units_state_bytes(spec, step.optimizer, [(start, end)]),
                saved_activation_bytes=saved[k] + copy, textbook_saved_bytes=saved[k] + copy,
                bubble_fraction=(len(ranges) - 1) / len(ranges),
                comm_bytes=2 * (costs.boundary_bytes[start] if k > 0 else 0)
                + 2 * (costs.boundary_bytes[end] if end < len(costs.boundary_bytes) else 0),
            ))
        if not separate_devices:
            # one device runs the plain step's very operations: its peak is the plain step's,
            # reported on the first stage's row like the measurement
            stages[0] = dataclasses.replace(stages[0], peak_bytes=plain_estimate(spec, step).peak_bytes)
        return stages

    def measure_stages(self, spec: MLPSpec, step: StepSpec, device: str, warmup: int, repeats: int,
                       placement: Any = None) -> list[Any]:
        """One row of measured figures per stage (``model_parallel_runtime.measure_stages``),
        each stage on its device of ``placement`` (``bpmem.strategies.placement``; decided here if None)."""
        from bpmem.strategies.model_parallel_runtime import measure_stages

        return measure_stages(spec, step, device, warmup, repeats, placement)
