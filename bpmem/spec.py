"""The network under study and how it is stepped: validated, frozen descriptions.

This module never imports torch, so that ``bpmem estimate`` answers before torch would have
loaded; ``bpmem.models.mlp`` turns a spec into modules and tensors.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

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
    from torch import nn

    from bpmem.figures import Estimate

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "sigmoid", "gelu")
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
# dtype name -> bytes per element. Kept free of torch so `bpmem estimate` never imports it.
DTYPES: dict[str, int] = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
OPTIMIZERS: tuple[str, ...] = ("sgd", "sgd-momentum", "adam", "adamw")
# how torch.optim runs the update: one parameter at a time, one kernel per op over all of
# them (``foreach``), or one fused kernel; ``default`` is PyTorch's own choice for the device
OPTIMIZER_IMPLS: tuple[str, ...] = ("default", "for-loop", "foreach", "fused")
AMP_DTYPES: tuple[str, ...] = ("none", "bfloat16", "float16")  # --amp: mixed precision (bpmem.measurement.precision)
MODES: tuple[str, ...] = ("train", "inference", "hvp")

# -- strategies: what every strategy's config is (``bpmem.strategies`` holds the strategies) --

ONE_DEVICE, RANKS, DEVICES = "one-device", "ranks", "devices"  # how a strategy's cell is laid out


class StrategyRuntime(Protocol):
    """What a single-device step needs of a strategy's runtime (``StrategyConfig.runtime``):
    a forward that runs the model its own way (checkpointed, in micro-batches, ...)."""

    name: str

    def forward(self, model: nn.Sequential, x: torch.Tensor) -> torch.Tensor: ...

    def params(self) -> dict[str, Any]: ...


C = TypeVar("C", bound="StrategyConfig")


BUDGET_HELP = ("a fraction of the plain step's retained bytes in (0, 1] (0.5), or bytes with a unit ('64MiB') "
               "or as an integer >= 2 (1000000)")


def parameter(default: Any, metavar: str, help: str, choices: tuple[str, ...] | None = None,
              minimum: int = 1) -> Any:
    """A strategy parameter: its default, what ``--help`` says about its flag, and what the
    config checks (an int is a count >= ``minimum``; a str one of ``choices``; a Budget parses)."""
    meta = {"metavar": metavar, "help": help, "choices": choices, "minimum": minimum}
    if isinstance(default, (int, float, str)):
        return dataclasses.field(default=default, metadata=meta)
    return dataclasses.field(default_factory=lambda: default, metadata=meta)


def strategy(name: str, summary: str, **traits: Any) -> Callable[[type[C]], type[C]]:
    """Declare a strategy config: its name, its one-line summary and any class traits
    (``in_timeline_plot=True``, ...), and make the class a frozen dataclass."""

    def declare(cls: type[C]) -> type[C]:
        for trait in traits:  # a trait the class hierarchy declares, never a new attribute
            if not hasattr(cls, trait):
                raise TypeError(f"{trait} is not a trait of {cls.__name__}")
        cls.name, cls.summary = name, summary
        for trait, value in traits.items():
            setattr(cls, trait, value)
        return dataclass(frozen=True)(cls)

    return declare


@dataclass(frozen=True)
class Budget:
    """A budget of retained bytes: a ``fraction`` of the plain step's, or absolute ``bytes``.

    Exactly one is set. ``Budget.parse`` reads 0.5, "0.5", 1, "64MiB", 1000000."""

    fraction: float | None = None
    bytes: int | None = None

    def __post_init__(self) -> None:
        fraction_ok = (self.fraction is None or (isinstance(self.fraction, float) and math.isfinite(self.fraction)
                                                 and 0 < self.fraction <= 1))
        bytes_ok = self.bytes is None or (isinstance(self.bytes, int) and not isinstance(self.bytes, bool)
                                          and self.bytes >= 2)
        if not (fraction_ok and bytes_ok) or (self.fraction is None) == (self.bytes is None):
            raise SpecError("budget", self.value, BUDGET_ALLOWED)

    @classmethod
    def parse(cls, value: Any) -> Budget:
        if isinstance(value, Budget):
            return value
        parsed = parse_budget(value)
        return cls(bytes=parsed) if isinstance(parsed, int) else cls(fraction=parsed)

    @property
    def value(self) -> float | int:
        """The number results.csv shows: the fraction, or the bytes."""
        return self.fraction if self.fraction is not None else self.bytes  # type: ignore[return-value]

    def of(self, plain_bytes: int) -> int:
        """The budget in bytes, given what the plain step retains."""
        return self.bytes if self.bytes is not None else int(self.fraction * plain_bytes)  # type: ignore[operator]


@dataclass(frozen=True)
class StrategyConfig:
    """Base of every strategy's config. Subclasses set the class variables and add their
    parameters as typed fields; ``params()`` is what results.csv's ``strategy_params`` and
    the cell id show."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help and docs/strategies.md
    placement: ClassVar[str] = ONE_DEVICE
    modes: ClassVar[tuple[str, ...]] = ("train", "inference")
    label_params: ClassVar[tuple[str, ...] | None] = None  # params the report's labels show (None: all)
    accumulates: ClassVar[bool] = False  # several forwards per step (micro-batches): the report's exercise 5
    # runs through torch.compile: its FLOPs are counted inside its own graphs (dynamo runs eagerly
    # under an outer FlopCounterMode); the live probe sees its compiled graphs run
    compiles: ClassVar[bool] = False
    in_timeline_plot: ClassVar[bool] = False  # one of the few the report's timeline plot draws
    predicts_by_arithmetic: ClassVar[bool] = True  # False: the prediction runs torch (on meta tensors)

    def __post_init__(self) -> None:
        """Check every parameter against its declaration, naming the field."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if isinstance(f.default, int):
                if isinstance(value, bool) or not isinstance(value, int) or value < meta["minimum"]:
                    context = f" (with strategy {self.name})" if meta["minimum"] > 1 else ""
                    raise SpecError(f.name, value, f"an integer >= {meta['minimum']}{context}")
            elif meta.get("choices"):
                check_choice(f.name, value, meta["choices"])
            elif not isinstance(f.default, str):  # a Budget: 0.5, "64MiB", ... become one
                object.__setattr__(self, f.name, Budget.parse(value))

    @property
    def world_size(self) -> int:
        return 1

    def params(self) -> dict[str, Any]:
        return {f.name: (v.value if isinstance(v := getattr(self, f.name), Budget) else v)
                for f in dataclasses.fields(self)}

    def check(self, spec: MLPSpec, step: StepSpec) -> None:
        """Raise ``ValueError`` ("field: why; allowed: ...") for a cell this strategy cannot run."""

    def predict(self, spec: MLPSpec, step: StepSpec, plain: Estimate) -> Estimate:
        """Every figure under this strategy, from the plain step's (``plain``)."""
        raise NotImplementedError

    def runtime(self, spec: MLPSpec, step: StepSpec) -> Any:
        """The forward wrapper a single-device step runs (``forward(model, x)``, ``params()``), or
        None for the workload's own forward."""
        raise NotImplementedError

    def why(self, spec: MLPSpec, plain_terms: dict[str, int], kept: int, plain: int) -> str:
        """One clause for the report: why this strategy keeps ``kept`` bytes for backward where
        the plain step keeps ``plain`` (whose terms, by name, are ``plain_terms``)."""
        return "its own plan decides what backward keeps"


@strategy("none", "the plain step: autograd keeps every intermediate its backward needs",
          modes=("train", "inference", "hvp"), in_timeline_plot=True)
class NoStrategy(StrategyConfig):
    """The plain step: forward, backward, optimizer step, nothing changed."""

    def predict(self, spec: MLPSpec, step: StepSpec, plain: Estimate) -> Estimate:
        return plain

    def runtime(self, spec: MLPSpec, step: StepSpec) -> Any:
        return None  # no wrapper: the step runs the workload's own forward




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
    (a forward in ``model.eval()`` under ``torch.inference_mode()``) or ``hvp`` (forward, a backward with
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
    amp: str = "none"  # autocast dtype of the forward and loss (bpmem.measurement.precision)

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
