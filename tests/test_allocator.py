"""The CPU allocator's own figures (``allocator_peak_bytes``, ``scratch_bytes``) and their
prediction (``bpmem.predict.allocator``), on models written for these tests."""

from __future__ import annotations

import pytest
import torch

from bpmem.measurement.cell import measure
from bpmem.measurement.precision import settle
from bpmem.measurement.step import make_optimizer, train_step
from bpmem.models.user_model import TensorShape, UserModel
from bpmem.predict.allocator import predict_allocator_peak
from bpmem.probes.allocator_view import blocks
from bpmem.strategies.registry import make_step
from bpmem.torch_private import allocator_events

FIXTURES = "tests.fixtures.user_models"
UNET = UserModel(f"{FIXTURES}:small_unet", data=f"{FIXTURES}:images")
GRU = UserModel(f"{FIXTURES}:gru_tagger", data=f"{FIXTURES}:sequences")
NORM_DROPOUT = UserModel(f"{FIXTURES}:norm_dropout", inputs=(TensorShape.parse("float32[B,32]", "--input"),),
                         target=TensorShape.parse("int64[B]<8", "--target"))


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
                for t in [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()), x, y,
                          *(v for s in optimizer.state.values() for v in s.values())]}
    live = peak = sum(blocks(n) for n in storages.values())
    del storages
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(workload, model, optimizer, x, y)
    for event in sorted(allocator_events(prof), key=lambda e: e.start_ns):
        live += blocks(event.nbytes)
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("workload", [UNET, GRU], ids=["unet", "gru"])
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


@pytest.mark.parametrize("workload", [UNET, GRU, NORM_DROPOUT], ids=["unet", "gru", "norm-dropout"])
@pytest.mark.parametrize("mode", ["train", "inference"])
def test_the_predicted_allocator_peak_is_within_one_percent(workload: UserModel, mode: str) -> None:
    """Calibrated at B = 2 and 4, predicted at B = 6 (not a calibration batch)."""
    step = make_step(batch_size=6, optimizer="adam", mode=mode)
    measured = measure(workload, step).allocator_peak_bytes
    predicted = predict_allocator_peak(workload, step)
    assert abs(predicted.allocator_peak_bytes - measured) <= 0.01 * measured
    assert predicted.calibration.check_error is not None and abs(predicted.calibration.check_error) <= 0.01


def test_a_fake_step_has_no_allocator_figure() -> None:
    fake = measure(UNET, make_step(batch_size=2), fake=True)
    assert fake.allocator_peak_bytes is None and fake.scratch_bytes is None
    assert torch.is_grad_enabled()
