"""How much each probe slows one training step down, and how fast the estimate is at a huge size.

One steady-state training step (B=256, 1024 -> 1024 x4 -> 10, float32, SGD, CPU) is timed
bare and under each probe, with a fresh probe made inside every timed call, so each figure
is "the step plus everything it costs to watch it":

- ``baseline``: ``train_step`` alone;
- ``saved``: ``SavedTensorProbe(model)``, the step run with ``scope=probe.scope``;
- ``held``: ``bpmem.measure(model, peak=False)``, the public API's saved figure (what
  autograd holds, deduplicated, attributed by module path);
- ``api``: ``bpmem.measure(model)``, both figures with attribution;
- ``live``: ``measure_training_peak`` (a ``LiveTensorProbe`` with params, grads, optimizer
  state and the batch as preexisting storages, the step run with ``phase=probe.phase``);
- ``rss``: ``RssProbe()`` (a psutil sampler thread, every millisecond);
- ``cuda-*``: the same model on CUDA, bare and under ``CudaProbe``; skipped without CUDA
  and kept in their own group, since a GPU step is not comparable with a CPU one.

Nothing here asserts on time. Each test records the memory figures its probe read, next to
the estimate's predictions, in ``extra_info`` (see ``--benchmark-json``). Run it with

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/test_probe_overhead.py \\
        --benchmark-columns=min,median,iqr,rounds

The table groups the tests by ``group`` ("probe-overhead"); the number in brackets after
each median is its ratio to the smallest median of the group, normally the baseline's, so
it reads directly as the probe's overhead factor. Add ``--benchmark-json=out.json`` to keep
the figures and ``extra_info``. The step uses whatever ``torch.get_num_threads()`` is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from bpmem.measurement.cell import measure_training_peak
from bpmem.measurement.step import make_optimizer, train_step
from bpmem.models.mlp import build, make_batch
from bpmem.predict.estimate import estimate
from bpmem.probes import CudaProbe, RssProbe, SavedTensorProbe
from bpmem.spec import MLPSpec
from bpmem.strategies.registry import make_step

SPEC = MLPSpec(input_dim=1024, hidden_dim=1024, output_dim=10, depth=4, dtype="float32")
STEP = make_step(batch_size=256, optimizer="sgd")
GROUP = "probe-overhead"
ROUNDS = 30
WARMUP_ROUNDS = 3

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Rig:
    """A model, its optimizer and a batch, past three warm-up steps (optimizer state exists)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.model = build(SPEC, device, seed=0)
        self.optimizer = make_optimizer(STEP, self.model)
        self.x, self.y = make_batch(SPEC, STEP.batch_size, device, seed=0)
        for _ in range(3):
            self.step()

    def step(self, **labellers: Any) -> float:
        return train_step(SPEC, self.model, self.optimizer, self.x, self.y, **labellers)


@pytest.fixture(scope="module")
def predicted() -> dict[str, int]:
    est = estimate(SPEC, STEP)
    return {
        "predicted_params_bytes": est.params_bytes,
        "predicted_saved_activation_bytes": est.saved_activation_bytes,
        "predicted_peak_bytes": est.peak_bytes,
        "predicted_inference_peak_bytes": est.inference_peak_bytes,
    }


@pytest.fixture(scope="module")
def cpu_rig() -> Rig:
    return Rig("cpu")


@pytest.fixture(scope="module")
def cuda_rig() -> Rig:
    return Rig("cuda")


def _run(benchmark: Any, fn: Callable[[], Any], predicted: dict[str, int], group: str = GROUP) -> Any:
    """Time ``fn`` (one watched or bare step), note the config, return fn's last result."""
    benchmark.group = group
    benchmark.extra_info.update(
        batch_size=STEP.batch_size, width=SPEC.hidden_dim, depth=SPEC.depth, dtype=SPEC.dtype,
        optimizer=STEP.optimizer, num_threads=torch.get_num_threads(), **predicted,
    )
    return benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)


def test_baseline(benchmark: Any, cpu_rig: Rig, predicted: dict[str, int]) -> None:
    loss = _run(benchmark, cpu_rig.step, predicted)
    benchmark.extra_info["loss"] = loss


def test_saved_tensor_probe(benchmark: Any, cpu_rig: Rig, predicted: dict[str, int]) -> None:
    def watched() -> SavedTensorProbe:
        probe = SavedTensorProbe(cpu_rig.model)
        with probe:
            cpu_rig.step(scope=probe.scope)
        return probe

    probe = _run(benchmark, watched, predicted)
    benchmark.extra_info["saved_activation_bytes"] = probe.saved_activation_bytes


def test_held_tensor_probe(benchmark: Any, cpu_rig: Rig, predicted: dict[str, int]) -> None:
    import bpmem

    def watched() -> Any:
        with bpmem.measure(cpu_rig.model, peak=False) as m:
            cpu_rig.step()
        return m

    m = _run(benchmark, watched, predicted)
    benchmark.extra_info["saved_activation_bytes"] = m.saved_activation_bytes


def test_public_api(benchmark: Any, cpu_rig: Rig, predicted: dict[str, int]) -> None:
    import bpmem

    def watched() -> Any:
        with bpmem.measure(cpu_rig.model, cpu_rig.optimizer) as m:
            cpu_rig.step()
        return m

    m = _run(benchmark, watched, predicted)
    benchmark.extra_info.update(saved_activation_bytes=m.saved_activation_bytes, peak_bytes=m.peak_bytes)


def test_live_tensor_probe(benchmark: Any, cpu_rig: Rig, predicted: dict[str, int]) -> None:
    def watched() -> Any:
        return measure_training_peak(SPEC, cpu_rig.model, cpu_rig.optimizer, cpu_rig.x, cpu_rig.y)

    probe = _run(benchmark, watched, predicted)
    benchmark.extra_info.update(peak_bytes=probe.peak_bytes, peak_phase=probe.peak_phase,
                                timeline_events=len(probe.timeline))


def test_rss_probe(benchmark: Any, cpu_rig: Rig, predicted: dict[str, int]) -> None:
    def watched() -> RssProbe:
        with RssProbe() as probe:
            cpu_rig.step()
        return probe

    probe = _run(benchmark, watched, predicted)
    benchmark.extra_info.update(rss_peak_bytes=probe.rss_peak_bytes, rss_start_bytes=probe.rss_start_bytes,
                                rss_growth_bytes=probe.rss_peak_bytes - probe.rss_start_bytes,
                                rss_samples=probe.samples)


@needs_cuda
def test_cuda_baseline(benchmark: Any, cuda_rig: Rig, predicted: dict[str, int]) -> None:
    def bare() -> float:
        loss = cuda_rig.step()
        torch.cuda.synchronize()
        return loss

    _run(benchmark, bare, predicted, group=f"{GROUP}-cuda")


@needs_cuda
def test_cuda_probe(benchmark: Any, cuda_rig: Rig, predicted: dict[str, int]) -> None:
    def watched() -> CudaProbe:
        with CudaProbe() as probe:  # synchronizes on entry and exit
            cuda_rig.step()
        return probe

    probe = _run(benchmark, watched, predicted, group=f"{GROUP}-cuda")
    benchmark.extra_info.update(probe.result())


def test_estimate_huge(benchmark: Any) -> None:
    """The estimate is arithmetic on shapes: a 1e6-row batch through 8192-wide layers is free."""
    spec, step = MLPSpec(hidden_dim=8192, depth=8), make_step(batch_size=1_000_000)
    benchmark.group = "estimate"
    est = benchmark(estimate, spec, step)
    benchmark.extra_info.update(
        hidden_dim=spec.hidden_dim, depth=spec.depth, batch_size=step.batch_size,
        predicted_params_bytes=est.params_bytes,
        predicted_saved_activation_bytes=est.saved_activation_bytes,
        predicted_peak_bytes=est.peak_bytes, timeline_events=len(est.timeline),
    )
