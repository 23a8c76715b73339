"""The network under study: a validated, frozen description and the model built from it.

The seed's network (D2L, "Forward Propagation, Back Propagation and Computational Graphs") is

    z = W1 x,  h = phi(z),  o = W2 h,  L = l(o, y),  s = lambda/2 (|W1|_F^2 + |W2|_F^2),  J = L + s

bpmem generalises it to ``depth`` hidden layers, an optional bias on every Linear (the seed's
exercise 2), four activations, two losses and four dtypes. ``depth=1`` is the seed itself.

Shapes, with a batch of B rows (exercise 1):
    X: (B, input_dim)   hidden h_i: (B, hidden_dim)   o: (B, output_dim)
    y: (B,) int64 class labels for cross_entropy, (B, output_dim) in the model dtype for mse.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "sigmoid", "gelu")
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
OPTIMIZERS: tuple[str, ...] = ("sgd", "sgd-momentum", "adam")
MODES: tuple[str, ...] = ("train", "inference")
STRATEGIES: tuple[str, ...] = ("none",)

_ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


class SpecError(ValueError):
    """A field of a spec holds a value outside its allowed set.

    ``field`` is the dataclass field name (the CLI turns it into ``--field-name``) and
    ``allowed`` describes the values that would have been accepted.
    """

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is not allowed; allowed: {allowed}")


def _check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(field, value, "an integer >= 1")


def _check_non_negative(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SpecError(field, value, "a finite number >= 0")


def _check_choice(field: str, value: Any, choices: tuple[str, ...] | dict[str, Any]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise SpecError(field, value, ", ".join(choices))


@dataclass(frozen=True)
class MLPSpec:
    """The network: ``depth`` hidden layers of width ``hidden_dim`` between input and output.

    Defaults are the seed's network on MNIST-sized data: 784 -> 256 -> 10, no bias, ReLU,
    cross-entropy, float32, lambda = 1e-3.
    """

    input_dim: int = 784
    hidden_dim: int = 256
    output_dim: int = 10
    depth: int = 1
    bias: bool = False
    activation: str = "relu"
    loss: str = "cross_entropy"
    dtype: str = "float32"
    l2: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("input_dim", "hidden_dim", "output_dim", "depth"):
            _check_positive_int(name, getattr(self, name))
        if not isinstance(self.bias, bool):
            raise SpecError("bias", self.bias, "true, false")
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_non_negative("l2", self.l2)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        """Bytes per element of the model dtype (4 for float32, 2 for bfloat16, ...)."""
        return DTYPES[self.dtype].itemsize

    def layer_dims(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of each Linear, input side first: depth + 1 of them."""
        widths = [self.input_dim] + [self.hidden_dim] * self.depth + [self.output_dim]
        return list(zip(widths[:-1], widths[1:], strict=True))

    def replace(self, **changes: Any) -> MLPSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class StepSpec:
    """How the network is exercised: one step on a batch of ``batch_size`` rows.

    ``mode`` is ``train`` (zero_grad, forward, backward, optimizer.step) or ``inference``
    (a forward under ``torch.inference_mode()``). ``lr`` and ``momentum`` only matter for
    the numbers the step produces, never for its memory.
    """

    batch_size: int = 64
    optimizer: str = "sgd"
    mode: str = "train"
    strategy: str = "none"
    lr: float = 0.01
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _check_positive_int("batch_size", self.batch_size)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_non_negative("lr", self.lr)
        _check_non_negative("momentum", self.momentum)


def build(spec: MLPSpec, device: str | torch.device = "cpu", seed: int | None = 0) -> nn.Sequential:
    """Linear, act, Linear, act, ..., Linear: ``2 * depth + 1`` modules, Linear at even indices.

    Weights use PyTorch's default init under ``seed`` so that two builds are identical.
    """
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(spec.layer_dims()):
        if index > 0:
            layers.append(_ACTIVATION_MODULES[spec.activation]())
        layers.append(nn.Linear(fan_in, fan_out, bias=spec.bias))
    return nn.Sequential(*layers).to(device=device, dtype=spec.torch_dtype)


def weight_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The W's of the regulariser: every Linear's weight, never its bias (as in the seed)."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def make_batch(
    spec: MLPSpec, batch_size: int, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (X, y): X is (B, input_dim); y is (B,) int64 labels or (B, output_dim) targets."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, spec.input_dim, generator=generator).to(device, spec.torch_dtype)
    if spec.loss == "cross_entropy":
        y = torch.randint(0, spec.output_dim, (batch_size,), generator=generator).to(device)
    else:
        y = torch.randn(batch_size, spec.output_dim, generator=generator).to(device, spec.torch_dtype)
    return x, y


def data_loss(spec: MLPSpec, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L = l(o, y), averaged over the batch."""
    if spec.loss == "cross_entropy":
        return nn.functional.cross_entropy(output, target)
    return nn.functional.mse_loss(output, target)


def regularizer(spec: MLPSpec, model: nn.Module) -> torch.Tensor:
    """s = lambda/2 * sum ||W||_F^2 over the weight matrices only."""
    squares = [w.pow(2).sum() for w in weight_matrices(model)]
    return torch.stack(squares).sum() * (spec.l2 / 2)


def objective(spec: MLPSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """J = L + s, the seed's objective."""
    return data_loss(spec, model(x), y) + regularizer(spec, model)
