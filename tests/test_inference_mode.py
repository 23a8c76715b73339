"""Inference as people run it: ``model.eval()`` under ``torch.inference_mode()``, measured
and predicted alike, with every module's training flag put back afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bpmem.measurement.cell import measure
from bpmem.measurement.step import inference_step
from bpmem.models.user_model import TensorShape, UserModel
from bpmem.probes import LiveTensorProbe
from bpmem.strategies.registry import make_step

NORM_DROPOUT = UserModel("tests.fixtures.user_models:norm_dropout",
                         inputs=(TensorShape.parse("float32[B,32]", "--input"),),
                         target=TensorShape.parse("int64[B]<8", "--target"))
PADDED_ENCODER = UserModel("tests.fixtures.user_models:padded_encoder", data="tests.fixtures.user_models:padded_tokens",
                           loss="mse")


def _live_peak(model: nn.Module, inputs: tuple[torch.Tensor, ...], train: bool) -> int:
    """The live-storage peak of one forward under inference_mode, run by hand here in ``train``
    or eval mode, over the parameters and inputs already live (no graph hooks: a forward
    without autograd builds no graph, and their function mode turns PyTorch's fast paths off)."""
    model.train(train)
    probe = LiveTensorProbe({"params": model.parameters(), "buffers": model.buffers(), "inputs": inputs},
                            hook_graphs=False)
    with probe, torch.inference_mode():
        model(*inputs)
    return probe.peak_bytes


def _inputs(workload: UserModel, batch_size: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = workload.build("cpu", seed=0)
    x, _ = workload.make_batch(batch_size, "cpu", seed=0)
    return model, x if isinstance(x, tuple) else (x,)


def test_the_inference_peak_is_the_eval_mode_forwards() -> None:
    """BatchNorm and Dropout at B=16: bpmem's inference peak is that of an eval-mode forward,
    measured and predicted alike. Live tensors alone cannot tell it from a train-mode forward
    here (Dropout's mask is made and freed inside its kernel); the CPU allocator's trace of
    the same forward also holds 512 B of BatchNorm's kernel scratch (``allocator_peak_bytes``);
    BatchNorm's 520 B of running statistics are resident, counted like the parameters."""
    step = make_step(batch_size=16, mode="inference")
    measured = measure(NORM_DROPOUT, step).inference_peak_bytes
    model, inputs = _inputs(NORM_DROPOUT, 16)
    assert measured == _live_peak(model, inputs, train=False) == 21_800
    assert measure(NORM_DROPOUT, step, fake=True).inference_peak_bytes == measured  # the estimate's dry run too


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_padded_encoder_takes_its_eval_fast_path_and_the_dry_run_says_it_cannot() -> None:
    """In eval mode a TransformerEncoder with a padding mask takes its fast path: fused layers
    on nested tensors, which drop the padded positions. bpmem measures that forward (a probe
    with graph hooks would have made PyTorch take the slow path, 142,440 B here). Fake tensors
    cannot run nested tensors, whose sizes come from the mask's values: the dry run runs the
    fused layers dense, on the padded input, and its estimate says so."""
    from bpmem.measurement.fast_paths import NESTED_CAVEAT

    step = make_step(batch_size=6, mode="inference")
    measured = measure(PADDED_ENCODER, step).inference_peak_bytes
    model, inputs = _inputs(PADDED_ENCODER, 6)
    assert measured == _live_peak(model, inputs, train=False) < _live_peak(model, inputs, train=True)
    estimate = measure(PADDED_ENCODER, step, fake=True)
    assert estimate.inference_peak_bytes != measured and NESTED_CAVEAT in estimate.caveats


def test_every_modules_training_flag_and_the_running_statistics_come_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    model[3].eval()  # a frozen norm inside a training model stays frozen
    before = [module.training for module in model.modules()]
    running = model[1].running_mean.clone()
    inference_step(model, torch.randn(4, 8) * 5 + 3)
    assert [module.training for module in model.modules()] == before == [True, True, True, True, False]
    assert torch.equal(model[1].running_mean, running)  # eval: the batch did not move the statistics
