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
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "sigmoid", "gelu")
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
# dtype name -> bytes per element. Kept free of torch so `bpmem estimate` never imports it.
DTYPES: dict[str, int] = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
OPTIMIZERS: tuple[str, ...] = ("sgd", "sgd-momentum", "adam")
MODES: tuple[str, ...] = ("train", "inference", "hvp")
SINGLE_DEVICE_STRATEGIES: tuple[str, ...] = (
    "none",
    "checkpoint-layer",
    "checkpoint-segments",
    "checkpoint-sqrt",
    "checkpoint-budget",
    "checkpoint-selective",
    "compile-budget",
    "microbatch",
)
# run by every rank of a torchrun job (bpmem.worker); world_size > 1
DISTRIBUTED_STRATEGIES: tuple[str, ...] = ("pipeline-gpipe", "pipeline-1f1b", "pipeline-interleaved", "ddp", "fsdp",
                                           "tensor-parallel")
# one process, the layers spread over world_size devices (cuda:0..N-1; bpmem.strategies.model_parallel)
MULTI_DEVICE_STRATEGIES: tuple[str, ...] = ("model-parallel",)
# split over world_size >= 2 devices or processes: one results row per device (rank)
SPLIT_STRATEGIES: tuple[str, ...] = DISTRIBUTED_STRATEGIES + MULTI_DEVICE_STRATEGIES
STRATEGIES: tuple[str, ...] = SINGLE_DEVICE_STRATEGIES + SPLIT_STRATEGIES
POLICIES: tuple[str, ...] = ("save-matmuls", "save-activations")

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


BUDGET_ALLOWED = "a fraction of the plain figure in (0, 1], or bytes: an integer >= 2 or a size with a unit ('64MiB')"


def parse_budget(value: Any) -> float | int:
    """A checkpoint budget, never ambiguous: a fraction of the plain step's retained bytes in
    (0, 1] (a float), or bytes (an int >= 2). Accepts 0.5, "0.5", 1 (the fraction 1.0),
    1000000, "1000000", "64MiB", "1.5 GiB"; refuses 1.5, which is neither. Raises SpecError."""
    from bpmem.units import parse_bytes

    if isinstance(value, bool):
        raise SpecError("budget", value, BUDGET_ALLOWED)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[0-9]+", text):
            value = int(text)
        elif re.fullmatch(r"[0-9]*\.[0-9]+|[0-9]+\.[0-9]*", text):
            value = float(text)
        else:
            try:
                value = parse_bytes(text)
            except ValueError:
                raise SpecError("budget", value, BUDGET_ALLOWED) from None
            if not re.search(r"[A-Za-z]", text) or value < 2:
                raise SpecError("budget", text, BUDGET_ALLOWED)
            return value
    if isinstance(value, int):
        if value == 1:
            return 1.0
        if value < 2:
            raise SpecError("budget", value, BUDGET_ALLOWED)
        return value
    if isinstance(value, float) and math.isfinite(value) and 0 < value <= 1:
        return value
    raise SpecError("budget", value, BUDGET_ALLOWED)


class InfeasibleBudget(ValueError):
    """The budget is below what one checkpoint over the whole chain retains: no plan fits.

    ``budget_bytes`` is what was asked, ``smallest_bytes`` the least any plan retains (one
    checkpoint over the whole chain keeps only its input, plus the loss internals), and
    ``plain_bytes`` what the plain step retains, so a message can give both forms."""

    def __init__(self, budget_bytes: int, smallest_bytes: int, plain_bytes: int) -> None:
        self.budget_bytes, self.smallest_bytes, self.plain_bytes = budget_bytes, smallest_bytes, plain_bytes
        # the smallest fraction, rounded up to 3 decimals, that still meets smallest_bytes
        fraction = math.ceil(smallest_bytes / plain_bytes * 1000) / 1000
        super().__init__(f"budget: {budget_bytes:,} B is below the smallest feasible budget, "
                         f"{smallest_bytes:,} B ({_iec(smallest_bytes)}); allowed: at least "
                         f"{smallest_bytes} bytes or a fraction >= {min(fraction, 1.0):g} of the plain "
                         f"{plain_bytes:,} B")


def _iec(nbytes: int) -> str:
    from bpmem.units import format_bytes

    return format_bytes(nbytes)


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
    ``lr`` and ``momentum`` only matter for the numbers the step produces, never for memory.

    Strategy parameters: ``segments`` (checkpoint-segments), ``budget`` (checkpoint-budget and
    compile-budget: a float in (0, 1] is a fraction of the plain figure, an int >= 2 is bytes;
    ``parse_budget`` reads every other form) and ``policy`` (checkpoint-selective).
    """

    batch_size: int = 64
    optimizer: str = "sgd"
    mode: str = "train"
    strategy: str = "none"
    segments: int = 4
    microbatches: int = 4
    world_size: int = 1
    budget: float = 0.5
    policy: str = "save-matmuls"
    lr: float = 0.01
    momentum: float = 0.9

    def strategy_params(self) -> dict[str, Any]:
        """The parameters that matter for this step's strategy (results.csv's strategy_params)."""
        if self.strategy == "checkpoint-segments":
            return {"segments": self.segments}
        if self.strategy in ("checkpoint-budget", "compile-budget"):
            return {"budget": self.budget}
        if self.strategy == "checkpoint-selective":
            return {"policy": self.policy}
        if self.strategy == "microbatch":
            return {"microbatches": self.microbatches}
        if self.strategy in ("ddp", "fsdp", "tensor-parallel", "model-parallel"):
            return {"world_size": self.world_size}
        if self.strategy in DISTRIBUTED_STRATEGIES:
            return {"microbatches": self.microbatches, "world_size": self.world_size}
        return {}

    def __post_init__(self) -> None:
        _check_positive_int("batch_size", self.batch_size)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_positive_int("segments", self.segments)
        _check_positive_int("microbatches", self.microbatches)
        _check_positive_int("world_size", self.world_size)
        if self.strategy in SPLIT_STRATEGIES and self.world_size < 2:
            raise SpecError("world_size", self.world_size, f"an integer >= 2 (with strategy {self.strategy})")
        if self.strategy not in SPLIT_STRATEGIES and self.world_size != 1:
            raise SpecError("world_size", self.world_size, f"1 (strategy {self.strategy} runs on one device)")
        if self.strategy in SPLIT_STRATEGIES and self.mode != "train":
            raise SpecError("mode", self.mode, f"train (with strategy {self.strategy})")
        if self.mode == "hvp" and self.strategy != "none":
            raise SpecError("strategy", self.strategy, "none (with mode hvp)")
        _check_choice("policy", self.policy, POLICIES)
        is_fraction = isinstance(self.budget, float) and math.isfinite(self.budget) and 0 < self.budget <= 1
        is_bytes = isinstance(self.budget, int) and not isinstance(self.budget, bool) and self.budget >= 2
        if not (is_fraction or is_bytes):
            raise SpecError("budget", self.budget, BUDGET_ALLOWED)
        _check_non_negative("lr", self.lr)
        _check_non_negative("momentum", self.momentum)
