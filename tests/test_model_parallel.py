"""``model-parallel``: the layers over several devices in one process.

On the CPU every stage shares the one device, so these tests prove the code path, the
per-stage accounting and the predictions for a shared device; the separate-device case
(the boundary copies) runs only where one process sees two GPUs.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bpmem.config import Cell, SweepConfig
from bpmem.environment import environment
from bpmem.estimate import estimate
from bpmem.placement import Machine
from bpmem.spec import MLPSpec, SpecError, StepSpec
from bpmem.strategies.base import NoStrategy
from bpmem.strategies.model_parallel import stage_ranges
from bpmem.strategies.model_parallel_runtime import stage_devices
from bpmem.strategies.registry import make_step
from bpmem.sweep_split import run_model_parallel_cell

MP = "model-parallel"
CASES = [
    (MLPSpec(input_dim=32, hidden_dim=64, output_dim=10, depth=5), make_step(batch_size=16, world_size=2, strategy=MP)),
    (MLPSpec(input_dim=20, hidden_dim=24, output_dim=6, depth=4, bias=True, activation="gelu", loss="mse"),
     make_step(batch_size=8, world_size=3, optimizer="adam", strategy=MP)),
    (MLPSpec(input_dim=12, hidden_dim=16, output_dim=3, depth=3, activation="tanh"),
     make_step(batch_size=5, world_size=4, optimizer="sgd-momentum", strategy=MP)),
]
FIGURES = ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes")


def measure_stages(spec: MLPSpec, step: StepSpec, device: str, warmup: int, repeats: int) -> list[dict]:
    return [stage.to_dict(drop_none=False) for stage in step.strategy.measure_stages(spec, step, device, warmup,
                                                                                       repeats)]


def predict_stages(spec: MLPSpec, step: StepSpec, separate_devices: bool) -> list[dict]:
    return [stage.to_dict(drop_none=False) for stage in step.strategy.predict_stages(spec, step, separate_devices)]


@pytest.mark.parametrize("spec,step", CASES)
def test_each_stage_holds_exactly_what_was_predicted(spec: MLPSpec, step: StepSpec) -> None:
    measured = measure_stages(spec, step, "cpu", warmup=0, repeats=1)
    predicted = predict_stages(spec, step, separate_devices=False)
    assert [row["rank"] for row in measured] == list(range(step.world_size))
    for got, want in zip(measured, predicted, strict=True):
        assert {k: got[k] for k in FIGURES} == {k: want[k] for k in FIGURES}
    # the stages share out the whole model's figures, nothing lost or counted twice
    plain = estimate(spec, replace(step, strategy=NoStrategy()))
    assert sum(row["params_bytes"] for row in measured) == plain.params_bytes
    assert sum(row["optimizer_bytes"] for row in measured) == plain.optimizer_bytes
    assert sum(row["saved_activation_bytes"] for row in measured) == plain.saved_activation_bytes


@pytest.mark.parametrize("spec,step", CASES)
def test_on_one_device_the_step_is_the_plain_step(spec: MLPSpec, step: StepSpec) -> None:
    measured = measure_stages(spec, step, "cpu", warmup=0, repeats=1)
    assert all(row["equivalence_max_rel_err"] == 0.0 for row in measured)
    plain = estimate(spec, replace(step, strategy=NoStrategy()))
    # one device, one peak: on the first stage's row; the others share it and leave it empty
    assert measured[0]["peak_bytes"] == plain.peak_bytes
    assert predict_stages(spec, step, separate_devices=False)[0]["peak_bytes"] == plain.peak_bytes
    assert all(row["peak_bytes"] is None for row in measured[1:])


def test_stage_ranges_split_the_units_evenly() -> None:
    spec = MLPSpec(depth=6)  # 7 units
    assert stage_ranges(spec, 3) == ((0, 3), (3, 5), (5, 7))
    assert stage_ranges(spec, 2) == ((0, 4), (4, 7))


def test_bubble_and_traffic_of_the_naive_split() -> None:
    spec, step = CASES[0]
    stages = predict_stages(spec, step, separate_devices=True)
    boundary = step.batch_size * spec.hidden_dim * spec.itemsize  # the unit-3 input crosses: (0,3) | (3,6)
    assert [s["bubble_fraction"] for s in stages] == [0.5, 0.5]
    assert [s["comm_bytes"] for s in stages] == [2 * boundary, 2 * boundary]
    shared = predict_stages(spec, step, separate_devices=False)
    # ReLU keeps its own output, so a second device also keeps its copy of the input
    assert stages[1]["saved_activation_bytes"] == shared[1]["saved_activation_bytes"] + boundary


def test_too_few_gpus_or_units_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # a machine with one GPU, described: the placement, not torch, says there is one
    monkeypatch.setattr(Machine, "here", classmethod(lambda cls: cls(gpu_count=1, cuda_available=True)))
    with pytest.raises(ValueError, match="world_size: world_size 2 needs 2 GPUs .*this machine has 1 GPU$"):
        stage_devices("cuda", 2)
    with pytest.raises(SpecError, match="world_size"):
        make_step(strategy="model-parallel", world_size=1)
    cell = Cell(MLPSpec(depth=1), make_step(strategy="model-parallel", world_size=3), "cpu")
    rows = run_model_parallel_cell(cell, "test", environment("cpu"), SweepConfig(repeats=1, warmup=0))
    assert [row["status"] for row in rows] == ["error"] * 3
    assert "depth: 1 gives 2 units" in rows[0]["error"]


def test_sweep_cell_writes_one_row_per_stage() -> None:
    spec, step = CASES[1]
    cell = Cell(spec, step, "cpu")
    rows = run_model_parallel_cell(cell, "test", environment("cpu"), SweepConfig(repeats=2, warmup=0))
    assert [(row["rank"], row["world_size"], row["status"]) for row in rows] == [(k, 3, "ok") for k in range(3)]
    for row in rows:
        for figure in (*FIGURES, "peak_bytes"):
            assert row[figure] == row[f"predicted_{figure}"], figure
        assert row["device"] == "cpu" and row["step_time_median_s"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs one process that sees two GPUs")
@pytest.mark.parametrize("spec,step", CASES[:2])
def test_on_two_gpus_each_device_keeps_its_stage_and_the_copies(spec: MLPSpec, step: StepSpec) -> None:
    step = replace(step, strategy=replace(step.strategy, world_size=2))
    measured = measure_stages(spec, step, "cuda", warmup=0, repeats=1)
    predicted = predict_stages(spec, step, separate_devices=True)
    assert [row["device"] for row in measured] == ["cuda:0", "cuda:1"]
    for got, want in zip(measured, predicted, strict=True):
        assert {k: got[k] for k in FIGURES} == {k: want[k] for k in FIGURES}
        assert got["peak_bytes"] > 0
    assert measured[0]["equivalence_max_rel_err"] < 1e-5
