"""The model seam: a model that is not the MLP runs through the same step, probes and
checkpointing runtime, given only the ``Workload`` protocol."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bpmem.analytic.planner import Segment
from bpmem.measurement.step import forward_objective, train_step
from bpmem.models.mlp import MLP, as_workload
from bpmem.models.workload import Workload
from bpmem.probes import LiveTensorProbe, SavedTensorProbe
from bpmem.spec import MLPSpec
from bpmem.strategies.checkpointing import SegmentStrategy


@dataclass(frozen=True)
class TinyConvNet:
    """A small CNN, written only against the protocol: two blocks, no regulariser."""

    name: str = "tiny-conv"

    def build(self, device: str | torch.device = "cpu", seed: int | None = 0) -> nn.Sequential:
        if seed is not None:
            torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, 5)).to(device)

    def make_batch(self, batch_size: int, device: str | torch.device = "cpu",
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, 3, 8, 8, generator=generator).to(device)
        return x, torch.randint(0, 5, (batch_size,), generator=generator).to(device)

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def data_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, target)

    def regularizer(self, model: nn.Module) -> None:
        return None

    def blocks(self, model: nn.Module) -> list[list[nn.Module]]:
        modules = list(model)
        return [modules[:4], modules[4:]]

    @property
    def analytic(self) -> None:
        return None


def _gradients(workload: Workload, strategy: SegmentStrategy | None) -> list[torch.Tensor]:
    model = workload.build()
    x, y = workload.make_batch(6)
    forward_objective(workload, model, x, y, strategy=strategy).backward()
    return [p.grad for p in model.parameters()]


def test_both_models_satisfy_the_protocol() -> None:
    assert isinstance(TinyConvNet(), Workload)
    assert isinstance(as_workload(MLPSpec()), Workload) and as_workload(MLPSpec()).analytic == MLPSpec()
    assert as_workload(TinyConvNet()) == TinyConvNet()


def test_checkpointing_a_workloads_blocks_keeps_its_gradients_and_saves_memory() -> None:
    workload = TinyConvNet()
    plan = (Segment(0, 1, True), Segment(1, 2, False))
    plain = _gradients(workload, None)
    checkpointed = _gradients(workload, SegmentStrategy("checkpoint-blocks", plan, workload.blocks))
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed, strict=True))

    def saved(strategy: SegmentStrategy | None) -> int:
        model = workload.build()
        x, y = workload.make_batch(6)
        probe = SavedTensorProbe(model)
        with probe:
            forward_objective(workload, model, x, y, probe.scope, strategy).backward()
        return probe.saved_activation_bytes

    # the first block's inner activation (the first tanh's output, 6 x 4 x 6 x 6 floats, which
    # that tanh and the second conv save) is dropped; the block's input and output are kept
    dropped = saved(None) - saved(SegmentStrategy("checkpoint-blocks", plan, workload.blocks))
    assert dropped == 6 * 4 * 6 * 6 * torch.tensor(0.0).element_size()


def test_a_training_step_of_any_workload_is_measured() -> None:
    workload = TinyConvNet()
    model = workload.build()
    x, y = workload.make_batch(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(workload, model, optimizer, x, y)  # the steady state
    probe = LiveTensorProbe({"params": model.parameters(), "grads": [p.grad for p in model.parameters()],
                             "inputs": [x, y]})
    with probe:
        loss = train_step(workload, model, optimizer, x, y, phase=probe.phase)
    assert loss == loss and probe.peak_bytes > probe.peak_by_category["params"]
    assert MLP(MLPSpec()).blocks(MLP(MLPSpec()).build())[-1][0].out_features == 10
