"""What every memory strategy is: a frozen, typed config that validates itself, labels
itself, predicts its figures and builds its runtime.

A strategy module (``bpmem.strategies.checkpoint_segments`` and the rest) holds one subclass
of ``StrategyConfig`` and nothing else that callers need; ``bpmem.strategies.registry``
lists them. Modules stay free of torch at import: a runtime imports it when it is built,
so ``bpmem estimate`` answers with arithmetic alone.

``NoStrategy`` (``none``, the plain step) lives here rather than in a module of its own
because every ``StepSpec`` starts from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from bpmem.placement import DEVICES, ONE_DEVICE, RANKS  # noqa: F401 - re-exported: where a strategy's cell runs
from bpmem.validation import BUDGET_ALLOWED, SpecError, check_choice, parse_budget

if TYPE_CHECKING:
    from bpmem.figures import Estimate, RankFigures
    from bpmem.spec import MLPSpec, StepSpec

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
    summary: ClassVar[str]  # one line for --help and the README
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


def has_arithmetic(spec: Any) -> bool:
    """Whether bpmem has an arithmetic model of ``spec``: an ``MLPSpec`` or the MLP workload
    yes; your own model (``--model``, whose ``analytic`` is None) no."""
    return getattr(spec, "analytic", spec) is not None


# what a split strategy's refusal of your own model offers instead
USER_MODEL_SPLITS = "ddp, fsdp, or a pipeline on an nn.Sequential model"


@dataclass(frozen=True)
class SplitConfig(StrategyConfig):
    """A strategy that spreads one step over ``world_size`` >= 2 ranks or devices; one results
    row per rank. ``predict_ranks`` gives each rank's figures."""

    world_size: int = parameter(2, "N", "ranks or devices, >= 2", minimum=2)  # type: ignore[assignment]
    modes: ClassVar[tuple[str, ...]] = ("train",)
    placement: ClassVar[str] = RANKS
    # each rank's peak predicted by a dry run of that rank alone (bpmem.rank_dry_run), where the
    # arithmetic has none: the wrapper's buffers come and go inside the library
    peak_by_dry_run: ClassVar[bool] = False
    # what of the MLP the strategy splits, where your own model need not have it (tensor-parallel's
    # Linear pairs): it then refuses your own model, saying so; None: it splits any model
    mlp_only: ClassVar[str | None] = None

    def check_model(self, spec: Any) -> None:
        """Raise ``ValueError`` ("field: why; allowed: ...") where this strategy cannot split the
        model at any batch size: asked before any process starts (a sweep config, the CLI)."""
        if self.mlp_only is not None and not has_arithmetic(spec):
            raise ValueError(f"strategy: {self.name} splits the MLP only ({self.mlp_only}); allowed with --model: "
                             f"{USER_MODEL_SPLITS}")

    def schedule_ranks(self) -> list[RankFigures]:
        """Each rank's figures where bpmem has no arithmetic model (your own): no bytes (the
        rows' ``predicted_`` columns stay empty), only what the schedule alone sets (the bubble)."""
        from bpmem.figures import RankFigures

        return [RankFigures() for _ in range(self.world_size)]

    def predict(self, spec: MLPSpec, step: StepSpec, plain: Estimate) -> Estimate:
        raise ValueError(f"strategy: {self.name} has one prediction per rank; allowed: predict_ranks")

    def predict_ranks(self, spec: MLPSpec, step: StepSpec) -> list[RankFigures]:
        raise NotImplementedError

    def setup_rank(self, spec: MLPSpec, step: StepSpec, rank: int, device: Any) -> Any:
        """This rank's share of the model and batch, and the step that drives it (a
        ``bpmem.strategies.rank_runtime.RankSetup``); run by every rank of a torchrun job."""
        raise NotImplementedError

    def setup_dry_rank(self, spec: MLPSpec, step: StepSpec, rank: int, device: Any) -> Any:
        """``setup_rank`` for ``bpmem.rank_dry_run``, in a process group whose collectives
        return without communicating: what a rank would learn from the others, it is told."""
        return self.setup_rank(spec, step, rank, device)

    def owned_parameters(self, spec: MLPSpec, rank: int) -> list[int]:
        """Indices (in ``model.parameters()`` order) of the parameters this rank holds a part of."""
        return list(range((spec.depth + 1) * (2 if spec.bias else 1)))
