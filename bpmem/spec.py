"""The network under study and how it is stepped: validated, frozen descriptions.

This module never imports torch, so that ``bpmem estimate`` answers before torch would have
loaded; ``bpmem.model`` turns a spec into modules and tensors.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bpmem.strategies.base import NoStrategy, StrategyConfig
from bpmem.validation import (  # noqa: F401 - re-exported: spec users need the errors too
    BUDGET_ALLOWED,
    InfeasibleBudget,
    SpecError,
    check_choice,
    check_non_negative,
    check_positive_int,
    parse_budget,
)

if TYPE_CHECKING:
    import torch

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "sigmoid", "gelu")
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
# dtype name -> bytes per element. Kept free of torch so `bpmem estimate` never imports it.
DTYPES: dict[str, int] = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
OPTIMIZERS: tuple[str, ...] = ("sgd", "sgd-momentum", "adam", "adamw")
# how torch.optim runs the update: one parameter at a time, one kernel per op over all of
# them (``foreach``), or one fused kernel; ``default`` is PyTorch's own choice for the device
OPTIMIZER_IMPLS: tuple[str, ...] = ("default", "for-loop", "foreach", "fused")
AMP_DTYPES: tuple[str, ...] = ("none", "bfloat16", "float16")  # --amp: mixed precision (bpmem.precision)
MODES: tuple[str, ...] = ("train", "inference", "hvp")


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
            check_positive_int(name, getattr(self, name))
        if not isinstance(self.bias, bool):
            raise SpecError("bias", self.bias, "true, false")
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("loss", self.loss, LOSSES)
        check_choice("dtype", self.dtype, DTYPES)
        check_non_negative("l2", self.l2)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def itemsize(self) -> int:
        """Bytes per element of the model dtype (4 for float32, 2 for bfloat16, ...)."""
        return DTYPES[self.dtype]

    def layer_dims(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of each Linear, input side first: depth + 1 of them."""
        widths = [self.input_dim] + [self.hidden_dim] * self.depth + [self.output_dim]
        return list(zip(widths[:-1], widths[1:], strict=True))

    def replace(self, **changes: Any) -> MLPSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class StepSpec:
    """How the network is exercised: one step on a batch of ``batch_size`` rows.

    ``mode`` is ``train`` (zero_grad, forward, backward, optimizer.step), ``inference``
    (a forward under ``torch.inference_mode()``) or ``hvp`` (forward, a backward with
    ``create_graph=True``, then a second backward for the Hessian-vector product H v).
    ``strategy`` is a strategy's typed config (``bpmem.strategies.registry`` builds one from a
    name and flat parameters). ``weight_decay`` is applied by the optimizer (coupled to the
    gradient for SGD and Adam, decoupled for AdamW); ``optimizer_impl`` picks torch.optim's
    implementation (``resolved_impl`` says which one runs on a device). ``lr`` and
    ``momentum`` only matter for the numbers the step produces, never for memory.
    """

    batch_size: int = 64
    optimizer: str = "sgd"
    mode: str = "train"
    strategy: StrategyConfig = field(default_factory=NoStrategy)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer_impl: str = "default"
    amp: str = "none"  # autocast dtype of the forward and loss (bpmem.precision)

    def resolved_impl(self, device_type: str) -> str:
        """The implementation torch.optim runs on ``device_type``: ``default`` is PyTorch's
        choice, foreach where every parameter is a CUDA tensor, else the for-loop."""
        if self.optimizer_impl != "default":
            return self.optimizer_impl
        return "foreach" if device_type == "cuda" else "for-loop"

    @property
    def world_size(self) -> int:
        """Ranks or devices the step is spread over: 1 but for the split strategies."""
        return self.strategy.world_size

    def strategy_params(self) -> dict[str, Any]:
        """The strategy's parameters (results.csv's strategy_params)."""
        return self.strategy.params()

    def replace(self, **changes: Any) -> StepSpec:
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        check_positive_int("batch_size", self.batch_size)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("mode", self.mode, MODES)
        if not isinstance(self.strategy, StrategyConfig):
            raise SpecError("strategy", self.strategy, "a strategy config (bpmem.strategies.registry.make_config)")
        if self.mode not in self.strategy.modes:
            raise SpecError("mode", self.mode, f"{', '.join(self.strategy.modes)} (with strategy "
                                               f"{self.strategy.name})")
        check_choice("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        check_choice("amp", self.amp, AMP_DTYPES)
        if self.amp != "none" and (self.strategy.world_size > 1 or self.strategy.compiles):
            # the ranks' steps and the compiled step run at full precision, for now
            raise SpecError("amp", self.amp, f"none with {self.strategy.name}")
        if self.amp != "none" and self.mode == "hvp":
            raise SpecError("amp", self.amp, "none with mode hvp (H v runs in float32)")
        check_non_negative("weight_decay", self.weight_decay)
        check_non_negative("lr", self.lr)
        check_non_negative("momentum", self.momentum)
