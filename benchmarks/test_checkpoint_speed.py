"""Checkpointing's price in time, next to what it saves in memory, measured side by side.

The acceptance case of the checkpointing issue: a depth-64, width-1024 MLP at B=256 on CPU
(float32, SGD). Each strategy's training step is timed with pytest-benchmark in one group,
so the bracketed ratio after each median is its slowdown against the plain step. Each test
also records, in ``extra_info``, the retained activation bytes measured by ``measure()``
(live storages at the end of forward) and predicted, and the recomputed FLOPs.

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/test_checkpoint_speed.py \\
        --benchmark-columns=min,median,iqr,rounds

Nothing here asserts on time; the retained-bytes ratio for sqrt is asserted, since it is a
deterministic byte count.
"""

from __future__ import annotations

import pytest

from bpmem.figures import Measured
from bpmem.measurement.cell import measure
from bpmem.measurement.step import make_optimizer, train_step
from bpmem.models.mlp import build, make_batch
from bpmem.predict.estimate import estimate
from bpmem.spec import MLPSpec
from bpmem.strategies.registry import make_step

SPEC = MLPSpec(input_dim=1024, hidden_dim=1024, output_dim=10, depth=64)
BATCH = 256
STRATEGIES = {
    "none": make_step(batch_size=BATCH),
    "checkpoint-sqrt": make_step(batch_size=BATCH, strategy="checkpoint-sqrt"),
    "checkpoint-segments-4": make_step(batch_size=BATCH, strategy="checkpoint-segments", segments=4),
    "checkpoint-layer": make_step(batch_size=BATCH, strategy="checkpoint-layer"),
    "checkpoint-budget-0.5": make_step(batch_size=BATCH, strategy="checkpoint-budget", budget=0.5),
    "checkpoint-selective-save-matmuls": make_step(batch_size=BATCH, strategy="checkpoint-selective"),
}
_MEASURED: dict[str, dict] = {}


def _measured(name: str) -> Measured:
    if name not in _MEASURED:
        _MEASURED[name] = measure(SPEC, STRATEGIES[name])
    return _MEASURED[name]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_step_time(benchmark, name: str) -> None:
    step = STRATEGIES[name]
    model = build(SPEC, seed=0)
    x, y = make_batch(SPEC, BATCH, seed=0)
    optimizer = make_optimizer(step, model)
    strategy = step.strategy.runtime(SPEC, step)
    benchmark.group = "checkpoint-depth64-width1024-B256"
    benchmark.pedantic(lambda: train_step(SPEC, model, optimizer, x, y, strategy=strategy),
                       rounds=5, warmup_rounds=1)
    measured, predicted = _measured(name), estimate(SPEC, step)
    benchmark.extra_info.update(
        saved_activation_bytes=measured.saved_activation_bytes,
        predicted_saved_activation_bytes=predicted.saved_activation_bytes,
        recompute_flops=measured.recompute_flops, peak_bytes=measured.peak_bytes,
        predicted_peak_bytes=predicted.peak_bytes,
        retained_vs_none=_measured("none").saved_activation_bytes / measured.saved_activation_bytes,
    )
    assert measured.saved_activation_bytes == predicted.saved_activation_bytes


def test_sqrt_retains_five_times_less() -> None:
    assert _measured("none").saved_activation_bytes >= 5 * _measured("checkpoint-sqrt").saved_activation_bytes
