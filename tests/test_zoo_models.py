"""Your own model, end to end, on every model shape bpmem knows: the issue-9 zoo
(``tests/fixtures/zoo.py``) and the two shipped examples (``bpmem/models``). For each, at
three batch sizes and in every mode, the estimate (fake tensors: no data, no memory) equals
the CPU measurement to the byte, and so does every single-device strategy that applies."""

from __future__ import annotations

import pytest
import torch

from bpmem.figures import PREDICTED_FIGURES
from bpmem.measurement.cell import measure
from bpmem.models.user_model import TensorShape, UserModel
from bpmem.strategies.registry import make_step


def _shapes(factory: str, inputs: str, target: str, loss: str = "cross_entropy") -> UserModel:
    return UserModel(f"tests.fixtures.zoo:{factory}", inputs=(TensorShape.parse(inputs, "--input"),),
                     target=TensorShape.parse(target, "--target"), loss=loss)


GPT = UserModel("bpmem.models.gpt:make_gpt", kwargs_json='{"layers": 2}', data="bpmem.models.gpt:make_batch",
                blocks_path="blocks")
RESNET = UserModel("bpmem.models.resnet:make_resnet", data="bpmem.models.resnet:make_batch")
MODELS = {
    "cnn": _shapes("cnn", "float32[B,3,12,12]", "int64[B]<10"),
    "transformer-block": _shapes("transformer_block", "float32[B,6,16]", "float32[B,6,16]", "mse"),
    "tied-embedding": _shapes("tied", "int64[B,6]<50", "int64[B,6]<50"),
    "frozen-backbone": _shapes("frozen_backbone", "float32[B,3,12,12]", "int64[B]<10"),
    "frozen-middle": _shapes("frozen_middle", "float32[B,256]", "float32[B,256]", "mse"),
    "in-place": _shapes("in_place", "float32[B,20]", "int64[B]<5"),
    "checkpointed-inside": _shapes("checkpointed_inside", "float32[B,32]", "int64[B]<4"),
    "bfloat16": _shapes("bfloat16_mlp", "bfloat16[B,40]", "int64[B]<6"),
    "gpt": GPT,
    "resnet": RESNET,
}
# models with attention: the CPU's flash kernel has no double backward, so no hvp
NO_HVP = {"transformer-block", "gpt"}
SEQUENTIAL = {"cnn", "frozen-backbone", "frozen-middle", "in-place", "bfloat16", "resnet"}
CHAIN_STRATEGIES = ("checkpoint-layer", "checkpoint-segments", "checkpoint-sqrt", "checkpoint-every-k",
                    "checkpoint-budget")


def _figures(measured: object) -> dict[str, int]:
    return {name: getattr(measured, name) for name in PREDICTED_FIGURES}


def _batch(size: int) -> object:
    return size if size == 3 else pytest.param(size, marks=pytest.mark.slow)  # one size in the fast tier


@pytest.mark.parametrize("batch_size", [_batch(1), _batch(3), _batch(8)])
@pytest.mark.parametrize("mode", ["train", "inference", "hvp"])
@pytest.mark.parametrize("name", list(MODELS))
def test_the_estimate_equals_the_measurement(name: str, mode: str, batch_size: int) -> None:
    step = make_step(batch_size=batch_size, mode=mode, optimizer="adam")
    if mode == "hvp" and name in NO_HVP:
        with pytest.raises(ValueError, match=r"^mode: hvp .*_scaled_dot_product_flash_attention_for_cpu_backward "
                                             r"has no double backward.*allowed: train, inference$"):
            measure(MODELS[name], step, fake=True)
        return
    real, fake = measure(MODELS[name], step), measure(MODELS[name], step, fake=True)
    assert _figures(fake) == _figures(real)
    assert fake.per_layer == real.per_layer and fake.caveats == []


def _strategy_cases() -> list[object]:
    """Every model x every strategy that applies; the fast tier runs each strategy once."""
    cases, fast = [], set()
    for name in MODELS:
        chain = CHAIN_STRATEGIES if name in SEQUENTIAL or name == "gpt" else ()
        for strategy in (*chain, "checkpoint-selective", "microbatch"):
            slow = name in ("gpt", "resnet") or strategy in fast or name == "in-place"
            fast.add(strategy)
            cases.append(pytest.param(name, strategy, marks=[pytest.mark.slow] if slow else []))
    return cases


# ReLU(inplace=True) overwrites the Linear output that a checkpoint cut there keeps as its input
# (and selective checkpointing's cache): torch.utils.checkpoint refuses, and so does bpmem
IN_PLACE_CLASHES = {("in-place", "checkpoint-layer"), ("in-place", "checkpoint-segments"),
                    ("in-place", "checkpoint-selective")}


@pytest.mark.parametrize("name,strategy", _strategy_cases())
def test_every_strategy_that_applies_is_estimated_exactly(name: str, strategy: str) -> None:
    step = make_step(strategy, batch_size=4, optimizer="adam")
    if strategy == "checkpoint-budget" and name == "frozen-backbone":
        # its frozen backbone saves nothing, so no checkpoint keeps less than the plain run: half of
        # the plain bytes is below every plan, and the error says how low a budget can go
        with pytest.raises(ValueError, match=r"^budget: .* is below the smallest feasible budget"):
            measure(MODELS[name], step, fake=True)
        return
    if (name, strategy) in IN_PLACE_CLASHES:
        for fake in (False, True):
            with pytest.raises(ValueError, match=rf"^strategy: {strategy} cannot run this model: an in-place op"):
                measure(MODELS[name], step, fake=fake)
        return
    real, fake = measure(MODELS[name], step), measure(MODELS[name], step, fake=True)
    assert _figures(fake) == _figures(real) and fake.recompute_flops == real.recompute_flops


@pytest.mark.parametrize("strategy", [pytest.param("checkpoint-layer", marks=pytest.mark.slow), "checkpoint-sqrt"])
def test_checkpointing_blocks_inside_the_models_forward_keeps_its_gradients(strategy: str) -> None:
    """--blocks transformer.h style: the GPT's own forward runs, its blocks checkpointed."""
    from bpmem.measurement.step import forward_objective
    from bpmem.strategies.checkpointing import SegmentStrategy

    runtime = make_step(strategy, batch_size=2).strategy.runtime(GPT, make_step(strategy, batch_size=2))
    assert isinstance(runtime, SegmentStrategy) and runtime.model_forward is not None

    def gradients(wrapper: object) -> list[torch.Tensor]:
        model = GPT.build()
        x, y = GPT.make_batch(2)
        forward_objective(GPT, model, x, y, strategy=wrapper).backward()
        return [p.grad for p in model.parameters()]

    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gradients(None), gradients(runtime), strict=True))
    plain = measure(GPT, make_step(batch_size=2))
    checkpointed = measure(GPT, make_step(strategy, batch_size=2))
    assert checkpointed.saved_activation_bytes < plain.saved_activation_bytes / 2  # a block keeps only its input


@pytest.mark.parametrize("fraction", [pytest.param(0.9, marks=pytest.mark.slow), 0.5,
                                      pytest.param(0.2, marks=pytest.mark.slow)])
def test_a_budget_on_your_own_model_is_met_with_measured_block_costs(fraction: float) -> None:
    """checkpoint-budget plans a user's chain from one watched forward: the plan's retained
    bytes stay within the share of the plain forward's, and the estimate still equals the run."""
    from bpmem.strategies.base import Budget

    plain = measure(RESNET, make_step(batch_size=4))
    step = make_step("checkpoint-budget", batch_size=4, budget=Budget(fraction=fraction))
    real, fake = measure(RESNET, step), measure(RESNET, step, fake=True)
    assert _figures(fake) == _figures(real) and real.strategy_params == fake.strategy_params
    assert real.saved_activation_bytes <= fraction * plain.saved_activation_bytes
