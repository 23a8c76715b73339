"""The runtime of the checkpointing strategies: ``torch.utils.checkpoint`` (non-reentrant) over a
chain of blocks, and the micro-batch marker ``train_step`` loops on.

The chain is the workload's ``blocks``. For the MLP, unit j of the ``nn.Sequential`` built by
``bpmem.models.mlp.build`` is modules [2j, 2j+2): a Linear and its activation; the last unit is
the output Linear alone, so there are depth + 1 units. Where the chain is the whole model (the
MLP, a user's ``nn.Sequential``) the runtime runs it segment by segment. Where the blocks sit
inside the model's own forward (a ``ModuleList`` named by ``--blocks``), the model runs its own
forward, and for the step each checkpointed segment's first block runs the whole segment
under one checkpoint while the segment's other blocks hand their input straight on.
RNG state is not saved (``preserve_rng_state=False``): the MLP has no dropout, and the
state would add a 5 KiB tensor per checkpoint for nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from bpmem.analytic.planner import Segment, describe
from bpmem.models.batch import call_model
from bpmem.models.mlp import units


def _hidden(output: Any) -> Any:
    """What the next block takes from a block's output: the output, or a tuple's first element
    (Hugging Face layers may return ``(hidden_states, ...)``)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _same(a: Any, b: Any) -> bool:
    """The same arguments: the very same tensors (by identity), equal other values."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    try:
        return bool(a is b or a == b)
    except Exception:  # noqa: BLE001 - a value without a plain truth (a cache object): by identity only
        return a is b


def _run(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


@dataclass(frozen=True)
class SegmentStrategy:
    """Runs the units segment by segment, checkpointing the segments the plan says."""

    name: str
    plan: tuple[Segment, ...] | None  # None: planned from the chain's length (``planner``) at the first step
    blocks: Callable[[nn.Module], list[list[nn.Module]]] = units  # the workload's chain
    planner: Callable[[int], list[Segment]] | None = None
    # the model's own forward, where the blocks sit inside it (``--blocks``); None: the chain is the model
    model_forward: Callable[[nn.Module, Any], torch.Tensor] | None = None
    # a planner that needs each block's measured costs (``checkpoint-budget``), used instead of ``planner``
    cost_planner: Callable[[Any], list[Segment]] | None = None
    # where the workload found the chain itself (no --blocks): model -> its FoundBlocks, or None
    found_blocks: Callable[[nn.Module], Any] | None = None

    def forward(self, model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if _checkpoints_itself(model):
            raise ValueError(f"strategy: {self.name} on a model that checkpoints its layers already (its factory "
                             "called gradient_checkpointing_enable()); allowed: --strategy none, which measures it "
                             "as it is")
        chain = self.blocks(model)
        found = self.found_blocks(model) if self.found_blocks is not None else None
        if found is not None and "found" not in self.__dict__:
            object.__setattr__(self, "found", found)
        if self.plan is None and self.cost_planner is not None:
            from bpmem.strategies.block_costs import measure_chain

            measured = measure_chain(model, self.model_forward or (lambda m, v: _run([*m.children()], v)), x, chain)
            object.__setattr__(self, "plan", tuple(self.cost_planner(measured)))
        if self.plan is None:
            object.__setattr__(self, "plan", tuple(self.planner(len(chain))))  # type: ignore[misc]
        if self.model_forward is not None and not _chain_is_the_model(model, chain):
            with _segments_in_place(chain, self.plan):
                return self.model_forward(model, x)
        for segment in self.plan:
            modules = [m for unit in chain[segment.start:segment.end] for m in unit]
            if segment.checkpointed:
                x = checkpoint(functools.partial(_run, modules), x, use_reentrant=False,
                               preserve_rng_state=False)
            else:
                x = _run(modules, x)
        return x

    def params(self) -> dict[str, Any]:
        plan = list(self.plan or ())
        found = self.__dict__.get("found")
        return {"segments": len(plan), "checkpointed": sum(s.checkpointed for s in plan), "plan": describe(plan),
                **({"blocks": found.path} if found is not None else {})}


def _checkpoints_itself(model: nn.Module) -> bool:
    """A Hugging Face model whose gradient checkpointing is on (``gradient_checkpointing_enable``)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the newer name first
        if name in type(model).__dict__ or any(name in vars(k) for k in type(model).__mro__):
            return bool(getattr(model, name))
    return False


def _chain_is_the_model(model: nn.Module, chain: list[list[nn.Module]]) -> bool:
    """An ``nn.Sequential`` whose children are the chain: run segment by segment, not by its forward."""
    return isinstance(model, nn.Sequential) and [m for unit in chain for m in unit] == list(model.children())


class NotAChain(ValueError):
    """The model does not call its blocks one after another, each on the last one's output."""

    def __init__(self, why: str, allowed: str = "--blocks naming a ModuleList whose blocks the forward calls in "
                                                 "order, each on the previous one's output, or checkpoint-selective"
                 ) -> None:
        super().__init__(f"blocks: {why}, so bpmem cannot checkpoint them as a chain; allowed: {allowed}")


@contextlib.contextmanager
def _segments_in_place(chain: list[list[nn.Module]], plan: tuple[Segment, ...]) -> Iterator[None]:
    """For the block: each checkpointed segment's first block runs the segment (checkpointed)
    when the model calls it; the segment's later blocks then pass their input on unchanged.
    Each replacement is an instance ``forward``, removed while the segment really runs (and
    when backward recomputes it), so every block keeps its own ``__call__`` and hooks."""
    patched: list[nn.Module] = []

    def run_segment(modules: list[nn.Module], x: torch.Tensor, more: tuple[Any, ...], named: dict[str, Any]) -> Any:
        saved = {id(m): m.__dict__.pop("forward") for m in modules if "forward" in m.__dict__}
        try:
            out: Any = x
            for module in modules:  # each block on the last one's hidden state, with the first's other arguments
                out = module(_hidden(out), *more, **named)
            return out
        finally:
            for m in modules:
                if id(m) in saved:
                    m.forward = saved[id(m)]

    for segment in plan:
        if not segment.checkpointed or segment.end - segment.start < 1:
            continue
        modules = [m for unit in chain[segment.start:segment.end] for m in unit]
        handed: list[Any] = []  # the segment's output, and the other arguments its first block took

        def first(*args: Any, _modules: list[nn.Module] = modules, _handed: list[Any] = handed,
                  **named: Any) -> Any:
            if not args:
                raise NotAChain("the model passes a block its input by keyword alone")
            x, more = args[0], args[1:]
            out = checkpoint(functools.partial(run_segment, _modules), x, more, named, use_reentrant=False,
                             preserve_rng_state=False)
            _handed[:] = [out, more, named]
            return out

        def passed_on(*args: Any, _handed: list[Any] = handed, **named: Any) -> Any:
            if not _handed or not args or args[0] is not _hidden(_handed[0]):
                raise NotAChain("the forward does not call the blocks in order on each other's output")
            if not (_same(args[1:], _handed[1]) and _same(named, _handed[2])):
                raise NotAChain("a later block of a segment takes other arguments than its first (a position bias "
                                "that the first block makes, say), so the segment cannot run as one checkpoint",
                                "checkpoint-layer (one block per segment), or checkpoint-selective")
            return _handed[0]

        for index, module in enumerate(modules):
            module.forward = first if index == 0 else passed_on
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


@dataclass(frozen=True)
class MicrobatchStrategy:
    """Gradient accumulation over ``microbatches`` slices of the batch (``train_step`` loops)."""

    microbatches: int = 4
    name: str = "microbatch"

    def forward(self, model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def params(self) -> dict[str, Any]:
        return {"microbatches": self.microbatches}


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
_ACTIVATIONS = {torch.ops.aten.relu.default, torch.ops.aten.tanh.default, torch.ops.aten.sigmoid.default,
                torch.ops.aten.gelu.default}


@dataclass(frozen=True)
class SelectiveStrategy:
    """One selective checkpoint over the whole model.

    ``save-matmuls``: mm/addmm outputs are kept in the checkpoint's own storage and only the
    activations are recomputed (cheap elementwise work). ``save-activations``: the reverse,
    activation outputs kept and every matmul recomputed. Kept outputs live outside
    autograd's saved tensors, so ``SavedTensorProbe`` cannot see them; the live-storage
    figure at the end of forward does.
    """

    policy: str = "save-matmuls"
    name: str = "checkpoint-selective"

    def _choose(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        keep = _MATMULS if self.policy == "save-matmuls" else _ACTIVATIONS
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    def forward(self, model: nn.Sequential, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        context = functools.partial(create_selective_checkpoint_contexts, self._choose)
        # the inputs as the model takes them: a tuple positionally, a dict by keyword
        return checkpoint(call_model, model, x, use_reentrant=False, preserve_rng_state=False, context_fn=context)

    def params(self) -> dict[str, Any]:
        return {"policy": self.policy}
