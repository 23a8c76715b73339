"""The analytic model against the probes: every figure, to the byte, on CPU.

The property test draws 200 random specs over the whole space the issue names (depth 1-6,
widths 1-512, batch 1-256, bias, every activation, both losses, float32/float64/bfloat16,
every optimizer) and demands equality, not closeness, for the saved bytes, the per-layer
attribution, the training peak, the inference peak and where the peak falls.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpmem.measurement.cell import measure, measure_inference_peak, measure_training_peak
from bpmem.measurement.step import make_optimizer, train_step
from bpmem.models.mlp import build, make_batch
from bpmem.predict.estimate import estimate
from bpmem.spec import ACTIVATIONS, LOSSES, OPTIMIZERS, MLPSpec, StepSpec
from bpmem.strategies.registry import make_step

EXACT_FIGURES = ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes", "peak_bytes",
                 "inference_peak_bytes")

widths = st.integers(min_value=1, max_value=512)


@st.composite
def configs(draw: st.DrawFn) -> tuple[MLPSpec, StepSpec]:
    spec = MLPSpec(
        input_dim=draw(widths), hidden_dim=draw(widths), output_dim=draw(widths),
        depth=draw(st.integers(1, 6)), bias=draw(st.booleans()),
        activation=draw(st.sampled_from(ACTIVATIONS)), loss=draw(st.sampled_from(LOSSES)),
        dtype=draw(st.sampled_from(("float32", "float64", "bfloat16"))),
    )
    spec = spec.replace(l2=draw(st.sampled_from((0.0, 1e-3))))
    step = make_step(batch_size=draw(st.integers(1, 256)), optimizer=draw(st.sampled_from(OPTIMIZERS)),
                     weight_decay=draw(st.sampled_from((0.0, 1e-2))),
                     optimizer_impl=draw(st.sampled_from(("for-loop", "foreach", "fused"))))
    return spec, step


def assert_estimate_matches_measure(spec: MLPSpec, step: StepSpec) -> None:
    measured = measure(spec, step)
    predicted = estimate(spec, step)
    for figure in EXACT_FIGURES:
        assert getattr(measured, figure) == getattr(predicted, figure), (figure, spec, step)
    if step.mode == "train":
        assert measured.per_layer == predicted.per_layer
        # Where the peak falls, by category, explains every byte of it.
        assert measured.peak_by_category == predicted.peak_by_category
        assert measured.peak_phase == predicted.peak_phase


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_estimate_equals_probes_exactly(config: tuple[MLPSpec, StepSpec]) -> None:
    assert_estimate_matches_measure(*config)


@pytest.mark.slow  # the fast tier checks autocast on fixed cases (tests/test_steps.py)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.sampled_from(("bfloat16", "float16")))
def test_mixed_precision_estimate_equals_probes_exactly(config: tuple[MLPSpec, StepSpec], amp: str) -> None:
    """Autocast has no arithmetic yet: its estimate is the step on fake tensors."""
    spec, step = config[0].replace(dtype="float32"), config[1].replace(amp=amp)  # autocast casts float32 itself
    fake, real = measure(spec, step, fake=True), measure(spec, step)
    for figure in EXACT_FIGURES:
        assert getattr(fake, figure) == getattr(real, figure), (figure, spec, step)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_activation_and_loss_at_the_edges(activation: str, loss: str) -> None:
    """All widths 1 and a batch of 1: the smallest case, where 0-dim scalars weigh most."""
    spec = MLPSpec(input_dim=1, hidden_dim=1, output_dim=1, depth=2, bias=True, activation=activation, loss=loss)
    for optimizer in OPTIMIZERS:
        for batch in (1, 2, 3):  # B > 1 with q = 1: MSE's 0-dim loss still spans B*q elements
            assert_estimate_matches_measure(spec, make_step(batch_size=batch, optimizer=optimizer))


def test_inference_mode_matches() -> None:
    assert_estimate_matches_measure(MLPSpec(depth=3, bias=True), make_step(batch_size=33, mode="inference"))


def test_seed_worked_example_breakdown_is_consistent() -> None:
    """The seed network (d=784, h=256, q=10, B=64): each term from its own formula."""
    spec, step = MLPSpec(), make_step(batch_size=64)
    est = estimate(spec, step)
    d, h, q, b, s = 784, 256, 10, 64, 4
    assert est.params_bytes == (h * d + q * h) * s
    assert est.grads_bytes == est.params_bytes
    assert est.optimizer_bytes == 0
    # X, the one hidden ReLU output, then log_softmax output + int64 labels + total_weight
    assert est.saved_activation_bytes == b * d * s + b * h * s + (b * q * s + b * 8 + s)
    assert est.inference_peak_bytes == est.params_bytes + b * d * s + b * max(2 * h, h + q) * s
    assert est.peak_bytes > est.params_bytes + est.grads_bytes + est.saved_activation_bytes
    assert est.training_to_inference_ratio == est.peak_bytes / est.inference_peak_bytes
    assert {t.name for t in est.terms} >= {"params", "grads", "optimizer", "saved: input batch X"}
    assert all(t.formula and t.source for t in est.terms)


def test_estimate_allocates_nothing_at_any_size() -> None:
    """A 1e6-row batch through 8 layers of 8192: answered from arithmetic alone."""
    est = estimate(MLPSpec(hidden_dim=8192, depth=8), make_step(batch_size=1_000_000))
    assert est.saved_activation_bytes > 8 * 1_000_000 * 8192 * 4
    assert est.peak_bytes > est.saved_activation_bytes


@pytest.mark.parametrize("optimizer,factor", [("sgd", 0), ("sgd-momentum", 1), ("adam", 2)])
def test_optimizer_state_formula(optimizer: str, factor: int) -> None:
    spec = MLPSpec(bias=True)
    est = estimate(spec, make_step(optimizer=optimizer))
    step_tensors = 4 * 4 if optimizer == "adam" else 0  # four parameters, one float32 step each
    assert est.optimizer_bytes == factor * est.params_bytes + step_tensors


def _live_totals(events: list, skip_setup: bool = False) -> list[int]:
    """The running totals of a timeline, each run of equal totals once. The replay's setup
    (the storages alive before the step, which the probe is handed) is skipped, keeping the
    total it reaches."""
    if skip_setup:
        start = next(i for i, e in enumerate(events) if e.phase != "outside") - 1
        events = events[start:]
    return [total for total, _ in itertools.groupby(e.live_bytes for e in events)]


def training_totals(spec: MLPSpec, step: StepSpec) -> tuple[list[int], list[int]]:
    """The running totals of one steady-state training step: measured, then replayed."""
    model = build(spec)
    x, y = make_batch(spec, step.batch_size)
    optim = make_optimizer(step, model)
    train_step(spec, model, optim, x, y)  # the steady state: optimizer state exists
    training = measure_training_peak(spec, model, optim, x, y)
    return _live_totals(training.ledger.events), _live_totals(estimate(spec, step).timeline, skip_setup=True)


# every activation with every loss, the optimizers taking turns (the slow tier runs them all),
# with and without the regulariser (l2 = 0 builds none)
TIMELINE_CASES = [pytest.param(activation, loss, optimizer, l2,
                               marks=[] if i % 3 == OPTIMIZERS.index(optimizer) and l2 == (0.0, 1e-3)[i % 2]
                               else [pytest.mark.slow])
                  for i, (activation, loss) in enumerate(itertools.product(ACTIVATIONS, LOSSES))
                  for optimizer in OPTIMIZERS for l2 in (1e-3, 0.0)]


@pytest.mark.parametrize("activation,loss,optimizer,l2", TIMELINE_CASES)
def test_the_predicted_timeline_is_the_measured_one(activation: str, loss: str, optimizer: str, l2: float) -> None:
    """Not only the peak: every total the step passes through, in order. The replay and the
    live probe keep the same ledger (``bpmem.analytic.ledger``), the replay one entry per
    storage it predicts, the probe one per storage an op returns."""
    spec = MLPSpec(input_dim=7, hidden_dim=12, output_dim=3, depth=3, activation=activation, loss=loss, l2=l2,
                   bias=activation in ("tanh", "gelu"), dtype="bfloat16" if optimizer == "adam" else "float32")
    step = make_step(batch_size=5, optimizer=optimizer)
    predicted = estimate(spec, step)
    measured, replayed = training_totals(spec, step)
    assert measured == replayed
    inference = measure_inference_peak(build(spec), make_batch(spec, step.batch_size)[0])
    assert _live_totals(inference.ledger.events) == _live_totals(predicted.inference_timeline, skip_setup=True)
