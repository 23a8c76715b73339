"""``model-parallel``: the layers over several devices in one process.

On the CPU every stage shares the one device, so these tests prove the code path, the
per-stage accounting and the predictions for a shared device; the separate-device case
(the boundary copies) runs only where one process sees two GPUs.
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import pytest
import torch

from bpmem.analytic.schedules import interleaved_order
from bpmem.predict.estimate import estimate, estimate_ranks
from bpmem.spec import MLPSpec, SpecError, StepSpec
from bpmem.strategies.base import NoStrategy
from bpmem.strategies.model_parallel import stage_ranges
from bpmem.strategies.model_parallel_runtime import stage_devices
from bpmem.strategies.placement import Machine
from bpmem.strategies.registry import make_step
from bpmem.sweep.config import Cell, SweepConfig
from bpmem.sweep.environment import environment
from bpmem.sweep.split import run_model_parallel_cell

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


# each case's stages as [start, end) units (unit i: the i-th Linear and the activation after
# it), split as evenly as the chain allows, the longer stages first: written out here, not
# taken from bpmem, so that a changed split fails the test below
SPLITS = [((0, 3), (3, 6)), ((0, 2), (2, 4), (4, 5)), ((0, 1), (1, 2), (2, 3), (3, 4))]


def expected_stages(spec: MLPSpec, step: StepSpec, split: tuple[tuple[int, int], ...]) -> list[dict]:
    """Each stage's figures from the model's shape alone (float32, 4 B an element): its
    Linears' weights (and biases), their gradients, the optimizer's state for them, and the
    activations its modules save first (bpmem.analytic is not used)."""
    assert spec.dtype == "float32"
    s, b, h = 4, step.batch_size, spec.hidden_dim
    dims = [spec.input_dim] + [h] * spec.depth + [spec.output_dim]
    units = len(dims) - 1
    params = [(dims[i] * dims[i + 1] + (dims[i + 1] if spec.bias else 0)) * s for i in range(units)]
    tensors = [2 if spec.bias else 1] * units  # parameter tensors per unit
    saved = [0] * units
    saved[0] += b * dims[0] * s  # the first Linear saves X
    for i in range(units - 1):  # each activation: ReLU and tanh save their output, GELU its input
        saved[i] += b * h * s
        if spec.activation == "gelu":  # GELU keeps z, so the next Linear is the first to save GELU's output
            saved[i + 1] += b * h * s
    q = spec.output_dim
    # the loss, on the last stage: log_softmax's output, the int64 labels, nll's total_weight;
    # MSE keeps the logits and the target
    loss = b * q * s + b * 8 + s if spec.loss == "cross_entropy" else 2 * b * q * s
    rows = []
    for k, (start, end) in enumerate(split):
        p = sum(params[start:end])
        state = {"sgd": 0, "sgd-momentum": p, "adam": 2 * p + s * sum(tensors[start:end])}[step.optimizer]
        rows.append({"params_bytes": p, "grads_bytes": p, "optimizer_bytes": state,
                     "saved_activation_bytes": sum(saved[start:end]) + (loss if k == len(split) - 1 else 0)})
    return rows


@pytest.mark.parametrize("spec,step,split", [(*case, split) for case, split in zip(CASES, SPLITS, strict=True)])
def test_each_stage_holds_exactly_what_was_predicted(spec: MLPSpec, step: StepSpec,
                                                     split: tuple[tuple[int, int], ...]) -> None:
    measured = measure_stages(spec, step, "cpu", warmup=0, repeats=1)
    predicted = predict_stages(spec, step, separate_devices=False)
    assert [row["rank"] for row in measured] == list(range(step.world_size))
    # both sides against figures stated from the shape: a split moved in bpmem moves both
    # sides alike (they share stage_ranges and stage_of_label), which only this catches
    expected = expected_stages(spec, step, split)
    assert [{k: row[k] for k in FIGURES} for row in measured] == expected
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


# -- the bubble, against a simulation of each schedule -------------------------------------

def _simulated_bubbles(orders: list[list[tuple[str, int, int]]], stages: int, cost: Fraction) -> list[Fraction]:
    """Each rank's idle share of the step when every forward and every backward of one stage on
    one micro-batch takes ``cost``: rank r runs its actions ("F"/"B", stage, micro-batch) in
    order, each as soon as the rank is free and what it needs is done (a forward the stage
    before's, a backward the stage after's, the last stage's backward its own forward)."""
    done: dict[tuple[str, int, int], Fraction] = {}
    free = [Fraction(0)] * len(orders)
    pending = [list(order) for order in orders]
    while any(pending):
        progressed = False
        for rank, queue in enumerate(pending):
            if not queue:
                continue
            kind, stage, micro = queue[0]
            if kind == "F":
                needs = [("F", stage - 1, micro)] if stage > 0 else []
            else:
                needs = [("B", stage + 1, micro)] if stage < stages - 1 else [("F", stage, micro)]
            if all(need in done for need in needs):
                done[queue.pop(0)] = free[rank] = max([free[rank], *(done[need] for need in needs)]) + cost
                progressed = True
        assert progressed, "the orders deadlock"
    makespan = max(free)
    return [1 - len(order) * cost / makespan for order in orders]


def _gpipe_orders(p: int, m: int) -> list[list[tuple[str, int, int]]]:
    return [[("F", r, j) for j in range(m)] + [("B", r, j) for j in range(m)] for r in range(p)]


def _one_f_one_b_orders(p: int, m: int) -> list[list[tuple[str, int, int]]]:
    orders = []
    for r in range(p):
        warmup = min(p - 1 - r, m)
        order = [("F", r, j) for j in range(warmup)]
        for j in range(warmup, m):
            order += [("F", r, j), ("B", r, j - warmup)]
        orders.append(order + [("B", r, j) for j in range(m - warmup, m)])
    return orders


def _interleaved_orders(p: int, m: int) -> list[list[tuple[str, int, int]]]:
    """torch's interleaved 1F1B order (as tests/test_distributed.py checks it), micro-batches numbered."""
    orders = []
    for r in range(p):
        seen: dict[tuple[str, int], int] = {}
        order = []
        for kind, stage in interleaved_order(r, p, m):
            seen[kind, stage] = seen.get((kind, stage), -1) + 1
            order.append((kind, stage, seen[kind, stage]))
        orders.append(order)
    return orders


PIPELINE_SPEC = MLPSpec(input_dim=32, hidden_dim=16, output_dim=4, depth=7)  # 8 units: 2 stages a rank on 4 ranks


@pytest.mark.parametrize("world,microbatches", [(2, 2), (2, 4), (3, 6), (4, 4)])
def test_the_pipelines_bubble_is_the_simulated_schedules_idle_share(world: int, microbatches: int) -> None:
    """bubble_fraction of each pipeline (and of model-parallel, one micro-batch), predicted,
    equals the idle share of its schedule simulated step by step: (p - 1) / (m + p - 1) for
    GPipe and 1F1B, (p - 1) / (v m + p - 1) for the interleaved schedule's v = 2 stages a rank,
    each half the work."""
    p, m = world, microbatches
    simulated = {
        "pipeline-gpipe": _simulated_bubbles(_gpipe_orders(p, m), p, Fraction(1)),
        "pipeline-1f1b": _simulated_bubbles(_one_f_one_b_orders(p, m), p, Fraction(1)),
        "pipeline-interleaved": _simulated_bubbles(_interleaved_orders(p, m), 2 * p, Fraction(1, 2)),
        MP: _simulated_bubbles(_gpipe_orders(p, 1), p, Fraction(1)),
    }
    for name, bubbles in simulated.items():
        extra = {} if name == MP else {"microbatches": m}
        step = make_step(batch_size=4 * m, strategy=name, world_size=p, **extra)
        predicted = [rank.bubble_fraction for rank in estimate_ranks(PIPELINE_SPEC, step)]
        assert predicted == pytest.approx([float(b) for b in bubbles], abs=1e-12), name
