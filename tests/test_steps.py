"""The training step users really run: no hidden regulariser when ``l2 = 0``. Each case is
checked three ways: the arithmetic replay, the live-tensor probe, and the CPU allocator's
own trace (torch.profiler ``profile_memory``), which does not share the probe's code."""

from __future__ import annotations

import pytest
import torch

from bpmem.measurement.cell import measure, optimizer_state_tensors
from bpmem.measurement.step import make_optimizer, train_step
from bpmem.models.mlp import as_workload, build
from bpmem.predict.estimate import estimate
from bpmem.probes import distinct_storage_bytes
from bpmem.probes.allocator import AllocatorTraceProbe
from bpmem.spec import OPTIMIZERS, MLPSpec
from bpmem.strategies.registry import make_step
from tests.test_estimate import training_totals


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


def test_the_issues_167808_bytes_are_the_same_peak_counted_in_64_byte_blocks() -> None:
    """The issue measured the l2 = 0 step at 167,808 B; bpmem reads 167,320 B of tensors. The
    two agree once every storage is counted as the block c10's CPU allocator hands out,
    aligned to 64 B: an independent figure, reproduced by the live probe and the dry run."""
    from bpmem.probes.live import allocator_blocks

    spec = MLPSpec(input_dim=113, hidden_dim=66, output_dim=28, depth=1, activation="tanh", l2=0.0)
    step = make_step(batch_size=98, optimizer="sgd")
    with allocator_blocks(64):
        in_blocks, dry_in_blocks = measure(spec, step).peak_bytes, measure(spec, step, fake=True).peak_bytes
    assert in_blocks == dry_in_blocks == 167_808  # the issue's figure, from outside bpmem
    assert measure(spec, step).peak_bytes < in_blocks  # the tensors' own bytes: 167,320 B


def test_l2_zero_leaves_no_regulariser_node_in_the_graph() -> None:
    spec = MLPSpec(depth=2, l2=0.0)
    workload = as_workload(spec)
    model = workload.build()
    assert workload.regularizer(model) is None
    x, y = workload.make_batch(4)
    objective = workload.data_loss(workload.forward(model, x), y)
    assert type(objective.grad_fn).__name__.startswith("NllLoss")  # J is L itself: no AddBackward on top
    assert torch.isfinite(objective)


# -- weight decay in the optimizer, and the three implementations of torch.optim --------------

IMPLS = ("for-loop", "foreach", "fused")


# every optimizer x implementation x (weight decay, l2); the fast tier runs a third of them
STEP_CASES = [pytest.param(optimizer, impl, weight_decay, l2,
                           marks=[] if (i + j + k) % 3 == 0 else [pytest.mark.slow])
              for i, optimizer in enumerate(OPTIMIZERS) for j, impl in enumerate(IMPLS)
              for k, (weight_decay, l2) in enumerate([(0.0, 1e-3), (1e-2, 0.0), (1e-2, 1e-3)])]


@pytest.mark.parametrize("optimizer,impl,weight_decay,l2", STEP_CASES)
def test_every_optimizer_implementation_is_replayed_exactly(optimizer: str, impl: str, weight_decay: float,
                                                          l2: float) -> None:
    """Every total the step passes through, in order, the optimizer's scratch included."""
    spec = MLPSpec(input_dim=7, hidden_dim=12, output_dim=3, depth=2, bias=True, activation="tanh", l2=l2)
    step = make_step(batch_size=5, optimizer=optimizer, optimizer_impl=impl, weight_decay=weight_decay)
    measured, replayed = training_totals(spec, step)
    assert measured == replayed
    assert estimate(spec, step).peak_bytes == max(measured)


def test_the_row_records_the_implementation_that_ran() -> None:
    step = make_step(optimizer="adam")
    assert step.resolved_impl("cpu") == "for-loop" and step.resolved_impl("cuda") == "foreach"
    assert make_step(optimizer_impl="fused").resolved_impl("cuda") == "fused"
    optim = make_optimizer(make_step(optimizer="adamw", optimizer_impl="foreach", weight_decay=0.1),
                           build(MLPSpec(depth=1)))
    assert isinstance(optim, torch.optim.AdamW) and optim.defaults["foreach"] and optim.defaults["weight_decay"] == 0.1


@pytest.mark.parametrize("optimizer,impl,weight_decay", [("adam", "foreach", 1e-3), ("sgd-momentum", "for-loop", 1e-3),
                                                         ("adamw", "fused", 1e-3)])
def test_three_steps_cells_agree_with_the_cpu_allocators_trace(optimizer: str, impl: str,
                                                               weight_decay: float) -> None:
    """Cells of benchmarks/configs/steps.toml (the seed network at depth 8, B = 64, l2 = 0).
    The allocator also sees what the dispatcher never returns: the 0-dim tensors that argument
    parsing wraps Python scalars in (here ``alpha=weight_decay``'s, a few bytes) while they
    are live at the peak. Nothing else: no kernel keeps scratch at these peaks."""
    spec = MLPSpec(depth=8, l2=0.0)
    step = make_step(batch_size=64, optimizer=optimizer, optimizer_impl=impl, weight_decay=weight_decay)
    predicted = estimate(spec, step).peak_bytes
    assert predicted == measure(spec, step).peak_bytes
    assert 0 <= _allocator_peak(spec, step) - predicted <= 16  # wrapped scalars: 8 B (double) + 4 B at most


# -- mixed precision: autocast around forward and loss, float32 parameters -------------------

def test_bfloat16_autocast_saves_what_its_ops_keep() -> None:
    """d=30 -> h=20 -> q=5, ReLU, cross-entropy, B=16, l2 = 0, under bfloat16 autocast (2 B):
    - the first mm saves its input cast to bfloat16 (B*d*2); the batch needs no gradient, so
      not the weight;
    - ReLU saves its bfloat16 output (B*h*2), which the second mm also keeps as its input;
    - the second mm's input needs a gradient, so it keeps the bfloat16 cast of W1 (q*h*2):
      a copy of a weight, made in forward, counted as an activation;
    - cross-entropy runs in float32 (autocast's list): log_softmax's float32 output
      (B*q*4), the int64 labels (B*8) and total_weight (4).
    The casts autocast caches and nothing saves die as the region ends."""
    B, d, h, q = 16, 30, 20, 5
    spec = MLPSpec(input_dim=d, hidden_dim=h, output_dim=q, depth=1, l2=0.0)
    measured = measure(spec, make_step(batch_size=B, amp="bfloat16"))
    assert measured.saved_activation_bytes == B * d * 2 + B * h * 2 + q * h * 2 + B * q * 4 + B * 8 + 4
    assert measured.grads_bytes == measured.params_bytes  # float32 gradients of float32 parameters


AMP_CASES = [("bfloat16", "none"), ("float16", "none"), ("bfloat16", "checkpoint-sqrt"),
             ("bfloat16", "checkpoint-selective"), ("float16", "microbatch")]


@pytest.mark.parametrize("amp,strategy", AMP_CASES)
def test_mixed_precision_is_estimated_exactly_without_memory(amp: str, strategy: str) -> None:
    """The arithmetic does not model autocast yet, so the estimate runs the step on fake
    tensors (bpmem.measurement.cell.measure(fake=True)); float16 takes its GradScaler's step."""
    spec = MLPSpec(depth=3, bias=True, activation="gelu")
    step = make_step(strategy, batch_size=16, optimizer="adam", amp=amp, optimizer_impl="foreach")
    fake, real = measure(spec, step, fake=True), measure(spec, step)
    for name in ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes", "peak_bytes",
                 "inference_peak_bytes"):
        assert getattr(fake, name) == getattr(real, name), name


@pytest.mark.slow  # a sweep and its report
def test_the_report_compares_the_two_ways_of_regularising(tmp_path) -> None:  # noqa: ANN001
    """Exercise 3 of the report sets the l2 term in the loss beside weight decay in the
    optimizer, on rows that differ in nothing else, with the CSV's own numbers."""
    import csv

    from tests.toml_text import run_sweep

    run_sweep(tmp_path, "reg", 'name = "reg"\nbatch_sizes = [32]\nrepeats = 1\nwarmup = 0\nmodes = ["train"]\n'
                               '[model]\ninput_dim = 40\nhidden_dim = 30\noutput_dim = 5\ndepth = 2\n'
                               'optimizer = "sgd-momentum"\nl2 = [0.0, 1e-3]\nweight_decay = [0.0, 1e-3]\n')
    rows = list(csv.DictReader((tmp_path / "run" / "results.csv").open()))
    peak = {(float(r["l2"]), float(r["weight_decay"])): int(r["peak_bytes"]) for r in rows}
    text = (tmp_path / "run" / "report.md").read_text()
    in_loss, in_optimizer = peak[(1e-3, 0.0)], peak[(0.0, 1e-3)]
    assert in_loss > in_optimizer  # the term's backward allocates more than the optimizer's copy
    assert f"peaks at {in_loss:,} B" in text and f"(0.001) at {in_optimizer:,} B" in text
    assert f"{in_loss - in_optimizer:,} B" in text


# -- the CUDA view of the prediction -------------------------------------------------------

def test_the_cuda_prediction_rounds_every_storage_to_the_allocators_block() -> None:
    """predicted_cuda_allocated_bytes: the dry run with every storage counted as a 512 B
    block, as max_memory_allocated counts it; equal to a real run counted the same way.
    512 is PyTorch's, not bpmem's: the CUDA caching allocator rounds every block up to a
    multiple of kMinBlockSize = 512 (c10/cuda/CUDACachingAllocator.cpp)."""
    from bpmem.predict.dry_run import predicted_cuda_allocated
    from bpmem.probes.live import CUDA_BLOCK_BYTES, allocator_blocks

    block = 512  # kMinBlockSize
    assert CUDA_BLOCK_BYTES == block
    spec, step = MLPSpec(depth=3), make_step(batch_size=33, optimizer="adam")
    predicted = predicted_cuda_allocated(spec, step)
    with allocator_blocks(block):
        rounded = measure(spec, step).peak_bytes
    assert predicted == rounded and predicted % block == 0
    assert predicted > measure(spec, step).peak_bytes  # 0-dim scalars and odd sizes each take a whole block


# two cases the hypothesis test found: a scaler that skips every warm-up step (no optimizer
# state at all), and one that settles, then skips the measured step as the weights move
SKIPPING = [
    (MLPSpec(input_dim=1, hidden_dim=1, output_dim=1, depth=1, activation="relu", loss="mse", l2=0.0),
     make_step(batch_size=2, optimizer="sgd-momentum", optimizer_impl="for-loop", amp="float16")),
    (MLPSpec(input_dim=1, hidden_dim=90, output_dim=1, depth=6, activation="tanh", loss="mse", l2=0.0),
     make_step(batch_size=1, optimizer="adamw", optimizer_impl="foreach", weight_decay=0.01, amp="float16")),
]


@pytest.mark.parametrize("spec,step", SKIPPING, ids=["skips-every-warm-up", "skips-the-measured-step"])
def test_a_float16_step_is_measured_after_the_scaler_has_settled(spec: MLPSpec, step: object) -> None:
    """GradScaler starts at 2**16 and skips every step whose gradients overflow float16. The
    estimate takes the step (fake tensors have no overflow to read). The measurement warms up
    until the scaler stops skipping, and measures the peak of a step that updates, so both see
    the steady state: optimizer state made, the optimizer's ops in the step."""
    fake, real = measure(spec, step, fake=True), measure(spec, step)  # type: ignore[arg-type]
    assert real.optimizer_bytes == fake.optimizer_bytes > 0
    assert (real.peak_bytes, real.saved_activation_bytes) == (fake.peak_bytes, fake.saved_activation_bytes)
