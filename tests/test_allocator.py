"""The CPU allocator's own figures (``allocator_peak_bytes``, ``scratch_bytes``) and their
prediction (``bpmem.predict.allocator``), on models written for these tests."""

from __future__ import annotations

import pytest
import torch

from bpmem.measurement.cell import measure
from bpmem.measurement.precision import settle
from bpmem.measurement.step import make_optimizer, train_step
from bpmem.models.user_model import TensorShape, UserModel
from bpmem.predict.allocator import calibration_for, predict_allocator_peak
from bpmem.probes.allocator_view import blocks
from bpmem.strategies.registry import make_step
from bpmem.torch_private import allocator_events

pytestmark = pytest.mark.slow  # real steps under the allocator's trace, a second or two each

FIXTURES = "tests.fixtures.user_models"
UNET = UserModel(f"{FIXTURES}:small_unet", data=f"{FIXTURES}:images")
GRU = UserModel(f"{FIXTURES}:gru_tagger", data=f"{FIXTURES}:sequences")
NORM_DROPOUT = UserModel(f"{FIXTURES}:norm_dropout", inputs=(TensorShape.parse("float32[B,32]", "--input"),),
                         target=TensorShape.parse("int64[B]<8", "--target"))
MIXED_NORMS = UserModel(f"{FIXTURES}:mixed_norms", data=f"{FIXTURES}:images")
EINSUM = UserModel(f"{FIXTURES}:einsum_attention", data=f"{FIXTURES}:tokens")
PADDED_ENCODER = UserModel(f"{FIXTURES}:padded_encoder", data=f"{FIXTURES}:padded_tokens", loss="mse")


def _independent_trace_peak(workload: UserModel, batch_size: int) -> int:
    """The allocator's peak over one Adam training step, traced here by hand: a profiled
    warm-up (so the frees of last step's gradients are sized), then a second profiled step,
    each event rounded to 64 B, over the resident storages as 64 B blocks."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(batch_size=batch_size, optimizer="adam")
    model = workload.build("cpu", seed=0)
    x, y = workload.make_batch(batch_size, "cpu", seed=0)
    optimizer = make_optimizer(step, model)
    settle(lambda: train_step(workload, model, optimizer, x, y), optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        train_step(workload, model, optimizer, x, y)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()),
                          *(x if isinstance(x, tuple) else (x,)), y,
                          *(v for s in optimizer.state.values() for v in s.values())]}
    live = peak = sum(blocks(n) for n in storages.values())
    del storages
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(workload, model, optimizer, x, y)
    for event in sorted(allocator_events(prof), key=lambda e: e.start_ns):
        live += blocks(event.nbytes)
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("workload", [UNET, GRU, PADDED_ENCODER, EINSUM], ids=["unet", "gru", "padded-encoder",
                                                                          "einsum"])
def test_the_allocator_peak_is_an_independent_trace_of_the_same_step(workload: UserModel) -> None:
    measured = measure(workload, make_step(batch_size=4, optimizer="adam"))
    assert measured.allocator_peak_bytes == _independent_trace_peak(workload, 4)
    assert measured.allocator_peak_bytes >= measured.peak_bytes  # tensors are blocks of it


def test_convolutions_scratch_is_seen_and_named() -> None:
    """oneDNN's convolutions reorder into blocked formats inside the kernel: a third of the
    U-Net's allocator peak is no tensor of the step."""
    measured = measure(UNET, make_step(batch_size=4, optimizer="adam"))
    assert measured.scratch_bytes > 0.2 * measured.allocator_peak_bytes
    inference = measure(UNET, make_step(batch_size=4, mode="inference"))
    assert inference.scratch_bytes > 0 and inference.allocator_peak_bytes > inference.peak_bytes


def _eval_forward_trace_peak(workload: UserModel, batch_size: int) -> int:
    """The allocator's peak over one forward as people run inference, traced here by hand:
    ``model.eval()`` under ``torch.inference_mode()``, each event rounded to 64 B, over the
    parameters, buffers and inputs as 64 B blocks."""
    from torch.profiler import ProfilerActivity, profile

    model = workload.build("cpu", seed=0).eval()
    x, _ = workload.make_batch(batch_size, "cpu", seed=0)
    inputs = x if isinstance(x, tuple) else (x,)
    live = peak = sum(blocks(t.untyped_storage().nbytes()) for t in [*model.parameters(), *model.buffers(), *inputs])
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(*inputs)
    for event in sorted(allocator_events(prof), key=lambda e: e.start_ns):
        live += blocks(event.nbytes)
        peak = max(peak, live)
    return peak


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("workload", [NORM_DROPOUT, PADDED_ENCODER], ids=["norm-dropout", "padded-encoder"])
def test_the_inference_allocator_peak_is_the_eval_forwards_trace(workload: UserModel) -> None:
    """Dropout off, BatchNorm on its running statistics, the encoder on its nested-tensor fast
    path: bpmem's inference figure is the allocator's own for the forward people run."""
    measured = measure(workload, make_step(batch_size=6, mode="inference"))
    assert measured.allocator_peak_bytes == _eval_forward_trace_peak(workload, 6)
    assert measured.allocator_peak_bytes % 64 == 0 and measured.allocator_peak_bytes >= measured.peak_bytes


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_fast_path_the_dry_run_cannot_follow_has_no_prediction() -> None:
    with pytest.raises(ValueError, match="fast path"):
        predict_allocator_peak(PADDED_ENCODER, make_step(batch_size=6, mode="inference"))


@pytest.mark.parametrize("workload", [UNET, GRU, NORM_DROPOUT, MIXED_NORMS, EINSUM],
                         ids=["unet", "gru", "norm-dropout", "mixed-norms", "einsum"])
@pytest.mark.parametrize("mode", ["train", "inference"])
def test_the_predicted_allocator_peak_is_within_one_percent(workload: UserModel, mode: str) -> None:
    """Calibrated at B = 2 and 4, predicted at B = 6 (not a calibration batch). Mixed norms'
    real step runs a ``div`` the dry run does not: its excess goes to the nearest shared op."""
    step = make_step(batch_size=6, optimizer="adam", mode=mode)
    measured = measure(workload, step).allocator_peak_bytes
    predicted = predict_allocator_peak(workload, step, calibration_for(workload, step, check=True))
    assert abs(predicted.allocator_peak_bytes - measured) <= 0.01 * measured
    assert predicted.calibration.check_error is not None and abs(predicted.calibration.check_error) <= 0.01


@pytest.mark.parametrize("workload", [UNET, GRU, NORM_DROPOUT, MIXED_NORMS, EINSUM],
                         ids=["unet", "gru", "norm-dropout", "mixed-norms", "einsum"])
def test_the_tensor_peaks_stay_exact_beside_the_allocators(workload: UserModel) -> None:
    """The allocator's figures sit beside the tensors' ones, which the dry run still gives to the byte."""
    step = make_step(batch_size=6, optimizer="adam")
    real, fake = measure(workload, step), measure(workload, step, fake=True)
    assert (fake.peak_bytes, fake.inference_peak_bytes, fake.saved_activation_bytes) == \
        (real.peak_bytes, real.inference_peak_bytes, real.saved_activation_bytes)


def test_a_fake_step_has_no_allocator_figure() -> None:
    fake = measure(UNET, make_step(batch_size=2), fake=True)
    assert fake.allocator_peak_bytes is None and fake.scratch_bytes is None
    assert torch.is_grad_enabled()


def test_estimate_gives_the_allocator_peak_that_measure_then_measures(capsys) -> None:
    import json

    from bpmem.cli import main

    flags = ["--model", UNET.factory, "--data", UNET.data, "--optimizer", "adam", "--batch-size", "6", "--json"]
    assert main(["estimate", *flags]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert main(["measure", *flags]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert estimate["predicted_allocator_peak_bytes"] == measured["allocator_peak_bytes"] > measured["peak_bytes"]
    assert "convolution" in estimate["calibrated_ops"] and estimate["calibration_error"] == 0
    assert main(["estimate", "--mode", "hvp", "--allocator", "--json"]) == 0
    hvp = json.loads(capsys.readouterr().out)
    assert "predicted_allocator_peak_bytes" not in hvp and "no allocator prediction" in hvp["allocator_not_predicted"]
