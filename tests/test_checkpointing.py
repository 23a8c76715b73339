"""Checkpointing strategies: exact retained bytes and recomputed FLOPs, the budget planner
against brute force, results equal to the plain step, and selective checkpointing measured
truly."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from bpmem.analytic.planner import (
    ChainCosts,
    brute_force_plan,
    plain_plan,
    plan_for_budget,
    uniform_plan,
)
from bpmem.analytic.rules import chain_costs
from bpmem.analytic.rules import loss_saved_bytes as loss_bytes
from bpmem.measurement.cell import measure
from bpmem.measurement.step import forward_objective
from bpmem.models.mlp import build, make_batch
from bpmem.predict.estimate import estimate
from bpmem.spec import ACTIVATIONS, LOSSES, MLPSpec, StepSpec
from bpmem.strategies import registry
from bpmem.strategies.registry import make_step

CHECKPOINTING = ("checkpoint-layer", "checkpoint-segments", "checkpoint-sqrt", "checkpoint-every-k",
                 "checkpoint-budget", "checkpoint-selective")
SMALL = MLPSpec(input_dim=20, hidden_dim=16, output_dim=5, depth=5)


def _step(strategy: str, **fields: object) -> StepSpec:
    """A step for ``strategy``, given candidate parameters of several strategies: only the
    ones it takes are passed (the registry refuses the rest)."""
    others = set(registry.parameters()) - set(registry.parameters(strategy))
    return make_step(strategy, **{k: v for k, v in fields.items() if k not in others})


@pytest.mark.parametrize("strategy", CHECKPOINTING)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_retained_bytes_and_recompute_flops_are_predicted_exactly(strategy: str, activation: str,
                                                                   loss: str) -> None:
    spec = SMALL.replace(activation=activation, loss=loss, bias=activation in ("tanh", "gelu"))
    for policy in (("save-matmuls", "save-activations") if strategy == "checkpoint-selective" else ("-",)):
        step = _step(batch_size=6, strategy=strategy, segments=2, budget=0.6, k=4,
                     policy=policy if policy != "-" else "save-matmuls")
        measured, predicted = measure(spec, step), estimate(spec, step)
        assert measured.saved_activation_bytes == predicted.saved_activation_bytes, (step, measured)
        assert measured.recompute_flops == predicted.recompute_flops, step


def test_selective_checkpointing_is_measured_truly() -> None:
    """Saved-tensor hooks see what autograd's SavedVariables hold. Selective checkpointing
    keeps its MUST_SAVE outputs in its own storage instead, so the hooks miss exactly those;
    the live storages at the end of forward include them."""
    spec, b = SMALL, 6
    s, h, q = spec.itemsize, spec.hidden_dim, spec.output_dim
    plain = measure(spec, make_step(batch_size=b))
    assert plain.saved_hook_bytes == plain.saved_activation_bytes  # nothing hidden without it
    selective = measure(spec, make_step(batch_size=b, strategy="checkpoint-selective", policy="save-matmuls"))
    hidden = selective.saved_activation_bytes - selective.saved_hook_bytes
    assert hidden == spec.depth * b * h * s + b * q * s  # every z_i and the logits o
    # what the hooks still see: the checkpoint's input X and the loss internals
    assert selective.saved_hook_bytes == b * spec.input_dim * s + loss_bytes(spec, b)
    segments = measure(spec, make_step(batch_size=b, strategy="checkpoint-segments", segments=2))
    assert segments.saved_hook_bytes == segments.saved_activation_bytes


def _gradients(spec: MLPSpec, step: StepSpec) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = build(spec, seed=3)
    x, y = make_batch(spec, step.batch_size, seed=4)
    objective = forward_objective(spec, model, x, y, strategy=step.strategy.runtime(spec, step))
    objective.backward()
    return objective.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("strategy,policy", [(s, "save-matmuls") for s in CHECKPOINTING]
                         + [("checkpoint-selective", "save-activations")])
def test_checkpointed_loss_and_gradients_equal_the_plain_step_bitwise(strategy: str, policy: str) -> None:
    spec = SMALL.replace(activation="gelu", bias=True)
    plain_j, plain_grads = _gradients(spec, make_step(batch_size=7))
    j, grads = _gradients(spec, _step(batch_size=7, strategy=strategy, segments=3, budget=0.5, policy=policy))
    assert torch.equal(j, plain_j)
    for got, want in zip(grads, plain_grads, strict=True):
        assert torch.equal(got, want)  # recomputation on CPU float32 is deterministic


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_compile_budget_meets_results_within_tolerance_and_recomputes() -> None:
    """torch.compile decomposes ops, so equality is to 1e-5 relative, not bitwise."""
    spec = MLPSpec(input_dim=32, hidden_dim=32, output_dim=10, depth=6)
    step = make_step(batch_size=16, strategy="compile-budget", budget=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_j, plain_grads = _gradients(spec, make_step(batch_size=16))
        j, grads = _gradients(spec, step)
        torch.testing.assert_close(j, plain_j, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        measured = measure(spec, step)
    plain = estimate(spec, make_step(batch_size=16)).saved_activation_bytes
    assert measured.saved_activation_bytes < plain
    assert measured.recompute_flops > 0
    assert measured.peak_bytes > measured.params_bytes  # the live probe, inside the compiled graphs


@pytest.mark.parametrize("budget", [pytest.param(1.0, marks=pytest.mark.slow), 0.5,
                                    pytest.param(0.2, marks=pytest.mark.slow)])
@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_compile_budget_is_predicted_exactly_by_the_partitioner_on_meta(budget: float) -> None:
    spec = MLPSpec(input_dim=48, hidden_dim=32, output_dim=5, depth=6, activation="gelu", bias=True)
    step = make_step(batch_size=16, strategy="compile-budget", budget=budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predicted, measured = estimate(spec, step), measure(spec, step)
    assert measured.saved_activation_bytes == predicted.saved_activation_bytes
    assert measured.recompute_flops == predicted.recompute_flops


def _random_costs(rng: random.Random, n: int) -> ChainCosts:
    return ChainCosts(
        boundary_bytes=tuple(rng.randint(1, 50) for _ in range(n)),
        internal_bytes=tuple(rng.choice((0, rng.randint(1, 50))) for _ in range(n)),
        forward_flops=tuple(rng.randint(1, 100) for _ in range(n)),
    )


@pytest.mark.slow  # a whole sweep
def test_budget_dp_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(150):
        costs = _random_costs(rng, rng.randint(1, 7))
        full = costs.plan_cost(plain_plan(costs.n))[0]
        for budget in range(0, full + 2, max(1, full // 12)):
            best = brute_force_plan(costs, budget)
            plan = plan_for_budget(costs, budget)
            if best is None:
                assert plan is None
                continue
            assert plan is not None
            plan_bytes, plan_flops = costs.plan_cost(plan)
            assert plan_bytes <= budget
            assert plan_flops == best[0]  # no plan within the budget recomputes less
            assert [s.start for s in plan][0] == 0 and plan[-1].end == costs.n


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_budget_plan_meets_ten_budgets_as_measured_and_beats_uniform_segments() -> None:
    spec, b = MLPSpec(input_dim=48, hidden_dim=32, output_dim=10, depth=9, activation="gelu"), 8
    costs = chain_costs(spec, b)
    loss = loss_bytes(spec, b)
    plain = costs.plan_cost(plain_plan(costs.n))[0] + loss
    smallest = costs.boundary_bytes[0] + loss  # one checkpointed segment over everything
    for k in range(10):
        budget = smallest + (plain - smallest) * k // 9
        step = make_step(batch_size=b, strategy="checkpoint-budget", budget=int(budget))
        measured = measure(spec, step)
        assert measured.saved_activation_bytes <= budget, (k, budget)
        uniform = [costs.plan_cost(uniform_plan(costs.n, segments)) for segments in range(1, costs.n + 1)]
        fitting = [flops for retained, flops in uniform if retained + loss <= budget]
        if fitting:
            assert measured.recompute_flops <= min(fitting)


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_sqrt_checkpointing_keeps_five_times_less_on_a_deep_chain() -> None:
    """A depth-64 chain (width 64 here, to stay quick): sqrt(65) -> 9 segments."""
    spec, b = MLPSpec(input_dim=64, hidden_dim=64, output_dim=10, depth=64), 16
    plain = measure(spec, make_step(batch_size=b)).saved_activation_bytes
    sqrt = measure(spec, make_step(batch_size=b, strategy="checkpoint-sqrt")).saved_activation_bytes
    assert plain >= 5 * sqrt


def test_layer_checkpointing_saves_nothing_for_relu() -> None:
    """Each unit's input is also the previous ReLU's saved output: per-layer checkpoints keep
    the same storages the plain step keeps, and recompute every matmul for nothing."""
    spec, step = SMALL, make_step(batch_size=6)
    plain = estimate(spec, step)
    layer = estimate(spec, make_step(batch_size=6, strategy="checkpoint-layer"))
    assert layer.saved_activation_bytes == plain.saved_activation_bytes
    assert layer.recompute_flops > 0


def test_hvp_saved_bytes_are_predicted_exactly() -> None:
    rng = random.Random(5)
    for _ in range(12):
        spec = MLPSpec(input_dim=rng.randint(1, 30), hidden_dim=rng.randint(1, 30), output_dim=rng.randint(1, 12),
                       depth=rng.randint(1, 4), bias=rng.random() < 0.5, activation=rng.choice(ACTIVATIONS),
                       loss=rng.choice(LOSSES), dtype=rng.choice(("float32", "float64", "bfloat16")))
        step = make_step(batch_size=rng.randint(1, 20), mode="hvp")
        assert measure(spec, step).saved_activation_bytes == estimate(spec, step).saved_activation_bytes
        train = estimate(spec, make_step(batch_size=step.batch_size))
        assert estimate(spec, step).saved_activation_bytes > train.saved_activation_bytes  # the graph grows


def test_impossible_budget_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="smallest feasible"):
        estimate(SMALL, make_step(batch_size=4, strategy="checkpoint-budget", budget=10))


@pytest.mark.parametrize("microbatches", [1, 3, 4])
def test_microbatch_retains_one_micro_batch_and_matches_the_full_batch(microbatches: int) -> None:
    """Gradient accumulation: the same gradients (summation order differs: 1e-6 relative),
    and the activations of the largest micro-batch only, exactly as predicted."""
    spec = SMALL.replace(activation="tanh", bias=True)
    step = make_step(batch_size=10, strategy="microbatch", microbatches=microbatches)
    plain_j, plain_grads = _gradients(spec, make_step(batch_size=10))
    model = build(spec, seed=3)
    x, y = make_batch(spec, 10, seed=4)
    from bpmem.measurement.step import make_optimizer, train_step

    optimizer = make_optimizer(step, model)
    total = train_step(spec, model, torch.optim.SGD(model.parameters(), lr=0.0), x, y,
                       strategy=step.strategy.runtime(spec, step))
    assert total == pytest.approx(plain_j.item(), rel=1e-6)
    for got, want in zip((p.grad for p in model.parameters()), plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    del optimizer
    measured, predicted = measure(spec, step), estimate(spec, step)
    assert measured.saved_activation_bytes == predicted.saved_activation_bytes
    if microbatches > 1:
        assert measured.saved_activation_bytes < estimate(spec, make_step(batch_size=10)).saved_activation_bytes
