"""The training step users really run: no hidden regulariser when ``l2 = 0``. Each case is
checked three ways: the arithmetic replay, the live-tensor probe, and the CPU allocator's
own trace (torch.profiler ``profile_memory``), which does not share the probe's code."""

from __future__ import annotations

import torch

from bpmem.estimate import estimate
from bpmem.measure_cell import measure, optimizer_state_tensors
from bpmem.model import as_workload
from bpmem.probes import distinct_storage_bytes
from bpmem.probes.allocator import AllocatorTraceProbe
from bpmem.spec import MLPSpec
from bpmem.step import make_optimizer, train_step
from bpmem.strategies.registry import make_step


def _allocator_peak(spec: MLPSpec, step: object) -> int:
    """The step's peak as the CPU allocator saw it, over what was live before it."""
    workload = as_workload(spec)
    model = workload.build("cpu")
    x, y = workload.make_batch(step.batch_size, "cpu")  # type: ignore[attr-defined]
    optimizer = make_optimizer(step, model)  # type: ignore[arg-type]
    train_step(workload, model, optimizer, x, y)
    optimizer.zero_grad(set_to_none=True)  # the trace cannot see frees of older blocks
    baseline = distinct_storage_bytes([*model.parameters(), *optimizer_state_tensors(optimizer), x, y])
    with AllocatorTraceProbe(baseline) as trace:
        train_step(workload, model, optimizer, x, y)
    return trace.peak_bytes


def test_l2_zero_builds_no_regulariser_and_its_peak_is_exact() -> None:
    """The seed network at 113-66-28, depth 1, tanh, SGD, B = 98: with l2 = 0 there is no
    lambda/2 sum ||W||^2 term, so its backward's pow(W, 1), 2*W and second dW never exist."""
    with_term = MLPSpec(input_dim=113, hidden_dim=66, output_dim=28, depth=1, activation="tanh")
    without = MLPSpec(input_dim=113, hidden_dim=66, output_dim=28, depth=1, activation="tanh", l2=0.0)
    step = make_step(batch_size=98, optimizer="sgd")
    for spec in (with_term, without):
        predicted, measured = estimate(spec, step), measure(spec, step)
        assert predicted.peak_bytes == measured.peak_bytes == _allocator_peak(spec, step)
    saved_by = {row["name"]: row["saved_bytes"] for row in measure(without, step).per_layer}
    assert saved_by.get("regularizer", 0) == 0
    # the term's backward costs, at its peak, one weight matrix per Linear more
    weights = sum(p.numel() * 4 for name, p in as_workload(without).build().named_parameters() if "weight" in name)
    gap = measure(with_term, step).peak_bytes - measure(without, step).peak_bytes
    assert gap > 0 and gap <= 2 * weights


def test_l2_zero_leaves_no_regulariser_node_in_the_graph() -> None:
    spec = MLPSpec(depth=2, l2=0.0)
    workload = as_workload(spec)
    model = workload.build()
    assert workload.regularizer(model) is None
    x, y = workload.make_batch(4)
    objective = workload.data_loss(workload.forward(model, x), y)
    assert type(objective.grad_fn).__name__.startswith("NllLoss")  # J is L itself: no AddBackward on top
    assert torch.isfinite(objective)
