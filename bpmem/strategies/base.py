"""What every memory strategy is: a frozen, typed config that validates itself, labels
itself, predicts its figures and builds its runtime.

A strategy module (``bpmem.strategies.checkpoint_segments`` and the rest) holds one subclass
of ``StrategyConfig`` and nothing else that callers need; ``bpmem.strategies.registry``
lists them. Modules stay free of torch at import: a runtime imports it when it is built,
so ``bpmem estimate`` answers with arithmetic alone.

``StrategyConfig``, its declaration helpers and ``NoStrategy`` (``none``, the plain step) are
defined in ``bpmem.spec``, because every ``StepSpec`` starts from the plain step, and are
re-exported here, where strategy modules import them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

# re-exported: every strategy module declares itself with these (they live in bpmem.spec, which
# every StepSpec needs, so that the shared vocabulary never imports a layer above it)
from bpmem.spec import (  # noqa: F401
    BUDGET_HELP,
    DEVICES,
    ONE_DEVICE,
    RANKS,
    Budget,
    NoStrategy,
    StrategyConfig,
    parameter,
    strategy,
)

if TYPE_CHECKING:
    from bpmem.figures import Estimate, RankFigures
    from bpmem.spec import MLPSpec, StepSpec

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
    # each rank's peak predicted by a dry run of that rank alone (bpmem.predict.rank_dry_run), where the
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
        """``setup_rank`` for ``bpmem.predict.rank_dry_run``, in a process group whose collectives
        return without communicating: what a rank would learn from the others, it is told."""
        return self.setup_rank(spec, step, rank, device)

    def owned_parameters(self, spec: MLPSpec, rank: int) -> list[int]:
        """Indices (in ``model.parameters()`` order) of the parameters this rank holds a part of."""
        return list(range((spec.depth + 1) * (2 if spec.bias else 1)))
