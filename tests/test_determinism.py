"""Every figure of a measurement is the same from run to run, and the per-module table adds up
to the saved figure, on models whose own forward calls reentrant checkpointing.

Reentrant checkpointing re-runs each checkpointed forward inside backward with grad enabled,
so autograd's saved-tensor hooks fire again there, on tensors that are freed at once. The
saved-tensor probe once counted those, keyed by storage address: a storage made later at a
freed one's address replaced the earlier one's entry, so ``saved_hook_bytes`` and
``per_layer`` moved with the allocator's reuse of addresses from run to run."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bpmem.measurement.cell import measure
from bpmem.models.user_model import TensorShape, UserModel
from bpmem.strategies.registry import make_step

WIDTH, IN, OUT, B, RUNS = 64, 20, 5, 5, 5

# the inference forward runs the checkpoints under inference_mode, where no input requires grad
pytestmark = pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin, self.act = nn.Linear(width, width), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


class ReentrantBlocks(nn.Module):
    """Linear+ReLU blocks, each under ``checkpoint(..., use_reentrant=True)``, as a user writes it."""

    def __init__(self, blocks: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH) for _ in range(blocks))
        self.out = nn.Linear(WIDTH, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=True)
        return self.out(x)


class ReentrantMix(nn.Module):
    """A mix: a checkpointed module, a plain block, checkpointed functions (torch ops outside any
    module, two blocks in one checkpoint, a parameter used without its module)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH) for _ in range(4))
        self.lins = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.out = nn.Linear(WIDTH, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = checkpoint(self.blocks[0], x, use_reentrant=True)
        x = self.blocks[1](x)
        x = checkpoint(lambda t: torch.tanh(self.lins[0](t)) * t, x, use_reentrant=True)
        x = checkpoint(lambda t: self.blocks[3](self.blocks[2](t)), x, use_reentrant=True)
        x = checkpoint(lambda t: torch.sigmoid(t @ self.lins[1].weight.t()), x, use_reentrant=True)
        return self.out(x)


def reentrant_blocks() -> nn.Module:
    return ReentrantBlocks()


def reentrant_mix() -> nn.Module:
    return ReentrantMix()


def _workload(factory: str) -> UserModel:
    return UserModel(f"tests.test_determinism:{factory}", inputs=(TensorShape.parse(f"float32[B,{IN}]", "--input"),),
                     target=TensorShape.parse(f"int64[B]<{OUT}", "--target"))


def _runs(factory: str) -> list[dict]:
    step = make_step(batch_size=B)
    return [measure(_workload(factory), step).to_dict() for _ in range(RUNS)]


def _assert_same_and_consistent(runs: list[dict]) -> dict:
    first = runs[0]
    for figure in ("saved_hook_bytes", "saved_activation_bytes", "peak_bytes", "per_layer"):
        assert [run[figure] for run in runs] == [first[figure]] * RUNS, figure
    assert runs == [first] * RUNS  # every other field too (the timeline, peak_by_category, ...)
    # the documented relation: per_layer splits saved_hook_bytes, which under reentrant
    # checkpointing is what autograd holds at the end of the forward, the saved figure itself
    assert sum(row["saved_bytes"] for row in first["per_layer"]) == first["saved_hook_bytes"]
    assert first["saved_hook_bytes"] == first["saved_activation_bytes"]
    return first


def test_reentrant_checkpoint_blocks_measure_the_same_every_run() -> None:
    first = _assert_same_and_consistent(_runs("reentrant_blocks"))
    s = 4  # float32
    # stated from the model's shape: the batch (inp's input), each checkpoint's input (its
    # ctx.save_for_backward, made at the root: "outside"), out's input, and the loss's own
    # (log_softmax's output, the int64 labels, nll's total_weight); no recomputed tensor
    blocks = len(ReentrantBlocks().blocks)
    by_name = {row["name"]: row["saved_bytes"] for row in first["per_layer"]}
    assert by_name["inp.Linear"] == B * IN * s
    assert by_name["outside"] == blocks * B * WIDTH * s
    assert by_name["out.Linear"] == B * WIDTH * s
    assert by_name["loss"] == B * OUT * s + B * 8 + s
    assert all(n == 0 for name, n in by_name.items() if name.startswith("blocks."))  # saved under no_grad: nothing
    assert first["saved_hook_bytes"] == B * IN * s + (blocks + 1) * B * WIDTH * s + B * OUT * s + B * 8 + s


def test_a_mix_of_reentrant_checkpoints_and_plain_blocks_measures_the_same_every_run() -> None:
    first = _assert_same_and_consistent(_runs("reentrant_mix"))
    by_name = {row["name"]: row["saved_bytes"] for row in first["per_layer"]}
    s = 4
    assert by_name["blocks.1.lin.Linear"] == by_name["blocks.1.act.ReLU"] == B * WIDTH * s  # the plain block
    # the inputs of the checkpoints the root calls, but the one that is the plain ReLU's output (its saver)
    assert by_name["outside"] == 3 * B * WIDTH * s


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_the_estimate_without_data_equals_the_measurement_under_reentrant_checkpointing() -> None:
    step = make_step(batch_size=B)
    for factory in ("reentrant_blocks", "reentrant_mix"):
        real, fake = measure(_workload(factory), step), measure(_workload(factory), step, fake=True)
        for figure in ("saved_hook_bytes", "saved_activation_bytes", "peak_bytes", "per_layer"):
            assert getattr(fake, figure) == getattr(real, figure), (factory, figure)
