"""compile-budget's peak: measured by the live probe inside the compiled graphs, predicted by
the same step on fake tensors, and both checked against the CPU allocator's own trace, which
shares no code with the probe."""

from __future__ import annotations

import warnings

import pytest

from bpmem.measurement.cell import measure, optimizer_state_tensors
from bpmem.measurement.step import make_optimizer, train_step
from bpmem.models.mlp import as_workload
from bpmem.predict.dry_run import estimate_exactly
from bpmem.probes import distinct_storage_bytes
from bpmem.probes.allocator import AllocatorTraceProbe
from bpmem.spec import MLPSpec
from bpmem.strategies.registry import make_step

CASES = [
    pytest.param(MLPSpec(depth=2), make_step(batch_size=32, strategy="compile-budget", budget=0.8), id="relu-0.8"),
    pytest.param(MLPSpec(input_dim=48, hidden_dim=32, output_dim=5, depth=6, activation="gelu", bias=True),
                 make_step(batch_size=16, strategy="compile-budget", budget=0.5, optimizer="adam"), id="gelu-adam-0.5"),
    pytest.param(MLPSpec(input_dim=64, hidden_dim=64, output_dim=10, depth=8),
                 make_step(batch_size=64, strategy="compile-budget", budget=0.3, optimizer="sgd-momentum"),
                 id="relu-momentum-0.3", marks=pytest.mark.slow),
]


def _allocator_peak(spec: MLPSpec, step: object) -> int:
    """The compiled step's peak as the CPU allocator saw it, from what was live before it."""
    workload = as_workload(spec)
    model = workload.build("cpu")
    x, y = workload.make_batch(step.batch_size, "cpu")  # type: ignore[attr-defined]
    optimizer = make_optimizer(step, model)  # type: ignore[arg-type]
    strategy = step.strategy.runtime(spec, step)  # type: ignore[attr-defined]
    for _ in range(2):  # compiled, then the optimizer's state made
        train_step(spec, model, optimizer, x, y, strategy=strategy)
    optimizer.zero_grad(set_to_none=True)  # the trace cannot see frees of older blocks
    with AllocatorTraceProbe(distinct_storage_bytes([*model.parameters(), *optimizer_state_tensors(optimizer),
                                                     x, y])) as trace:
        train_step(spec, model, optimizer, x, y, strategy=strategy)
    return trace.peak_bytes


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
@pytest.mark.parametrize("spec,step", CASES)
def test_the_live_probe_sees_inside_the_compiled_graphs_to_the_allocators_byte(spec: MLPSpec, step: object) -> None:
    """Before, dynamo ran the model eagerly under the probe's mode, so the probe read the
    eager step's peak (5,270,544 B against 5,329,928 B at depth 4, B = 64, budget 0.5)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = measure(spec, step)
        assert measured.peak_bytes == _allocator_peak(spec, step)
    assert measured.peak_phase == "backward" and measured.timeline


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
@pytest.mark.parametrize("spec,step", CASES)
def test_the_peak_is_predicted_by_the_compiled_step_on_fake_tensors(spec: MLPSpec, step: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predicted, measured = estimate_exactly(spec, step), measure(spec, step)
    assert predicted.peak_from_dry_run and predicted.peak_is_exact
    assert (predicted.peak_bytes, predicted.saved_activation_bytes) == (measured.peak_bytes,
                                                                       measured.saved_activation_bytes)


@pytest.mark.parametrize("depth", [1, 3])
def test_recomputed_flops_at_batch_one_are_the_measured_ones_and_never_negative(depth: int) -> None:
    """quick.toml's crash: at B=1 every weight gradient is a matmul with inner dimension 1,
    which inductor's decompositions rewrite as a broadcast multiply on every device but the
    CPU. The plan traced on the meta device was therefore not the CPU's graph, its FLOP
    counter missed each weight gradient, and it predicted -2*in*out per layer (-406,528 at
    the seed's 784-256-10), a figure results.csv's reader then refused."""
    spec, step = MLPSpec(depth=depth), make_step(batch_size=1, strategy="compile-budget", budget=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predicted, measured = estimate_exactly(spec, step), measure(spec, step)
    assert predicted.recompute_flops == measured.recompute_flops
    assert predicted.recompute_flops >= 0
