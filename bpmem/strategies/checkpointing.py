"""Gradient checkpointing with ``torch.utils.checkpoint`` (non-reentrant), over the MLP's units.

Unit j of the ``nn.Sequential`` built by ``bpmem.model.build`` is modules [2j, 2j+2): a Linear
and its activation; the last unit is the output Linear alone, so there are depth + 1 units.
RNG state is not saved (``preserve_rng_state=False``): the MLP has no dropout, and the
state would add a 5 KiB tensor per checkpoint for nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from bpmem.spec import InfeasibleBudget, MLPSpec, StepSpec
from bpmem.strategies.planner import (
    ChainCosts,
    Segment,
    describe,
    layer_plan,
    plain_plan,
    plan_for_budget,
    sqrt_segments,
    uniform_plan,
)


class Strategy(Protocol):
    name: str

    def forward(self, model: nn.Sequential, x: torch.Tensor) -> torch.Tensor: ...

    def params(self) -> dict[str, Any]: ...


def units(model: nn.Sequential) -> list[list[nn.Module]]:
    """[[Linear_0, act_0], [Linear_1, act_1], ..., [Linear_depth]]."""
    modules = list(model)
    return [modules[i:i + 2] for i in range(0, len(modules), 2)]


def chain_costs(spec: MLPSpec, batch_size: int) -> ChainCosts:
    """Bytes and FLOPs of each unit at this batch size (see ``planner`` for what they mean)."""
    s, b, dims = spec.itemsize, batch_size, spec.layer_dims()
    gelu = spec.activation == "gelu"
    return ChainCosts(
        boundary_bytes=tuple(b * fan_in * s for fan_in, _ in dims),
        internal_bytes=tuple(b * fan_out * s if gelu and j < len(dims) - 1 else 0
                             for j, (_, fan_out) in enumerate(dims)),
        forward_flops=tuple(2 * b * fan_in * fan_out for fan_in, fan_out in dims),
    )


def loss_bytes(spec: MLPSpec, batch_size: int) -> int:
    """What the loss saves: log_softmax output, int64 labels and total_weight; or o and y."""
    s, b, q = spec.itemsize, batch_size, spec.output_dim
    return b * q * s + b * 8 + s if spec.loss == "cross_entropy" else 2 * b * q * s


def budget_bytes(spec: MLPSpec, step: StepSpec) -> int:
    """A budget of retained bytes: ``budget`` itself when > 1, else that fraction of plain."""
    if step.budget > 1:
        return int(step.budget)
    costs = chain_costs(spec, step.batch_size)
    plain = costs.plan_cost(plain_plan(costs.n))[0] + loss_bytes(spec, step.batch_size)
    return int(step.budget * plain)


def plan_for(spec: MLPSpec, step: StepSpec) -> list[Segment]:
    """The segments a checkpointing strategy runs; raises ValueError for an impossible budget."""
    n = spec.depth + 1
    if step.strategy == "checkpoint-layer":
        return layer_plan(n)
    if step.strategy == "checkpoint-segments":
        return uniform_plan(n, step.segments)
    if step.strategy == "checkpoint-sqrt":
        return uniform_plan(n, sqrt_segments(n))
    if step.strategy == "checkpoint-budget":
        costs = chain_costs(spec, step.batch_size)
        limit = budget_bytes(spec, step) - loss_bytes(spec, step.batch_size)
        plan = plan_for_budget(costs, limit)
        if plan is None:
            smallest = costs.boundary_bytes[0] + loss_bytes(spec, step.batch_size)
            plain = costs.plan_cost(plain_plan(costs.n))[0] + loss_bytes(spec, step.batch_size)
            raise InfeasibleBudget(budget_bytes(spec, step), smallest, plain)
        return plan
    return plain_plan(n)


def _run(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


@dataclass(frozen=True)
class PlainStrategy:
    name: str = "none"

    def forward(self, model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def params(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class SegmentStrategy:
    """Runs the units segment by segment, checkpointing the segments the plan says."""

    name: str
    plan: tuple[Segment, ...]

    def forward(self, model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        chain = units(model)
        for segment in self.plan:
            modules = [m for unit in chain[segment.start:segment.end] for m in unit]
            if segment.checkpointed:
                x = checkpoint(functools.partial(_run, modules), x, use_reentrant=False,
                               preserve_rng_state=False)
            else:
                x = _run(modules, x)
        return x

    def params(self) -> dict[str, Any]:
        checkpointed = sum(s.checkpointed for s in self.plan)
        return {"segments": len(self.plan), "checkpointed": checkpointed, "plan": describe(list(self.plan))}


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

    def forward(self, model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        context = functools.partial(create_selective_checkpoint_contexts, self._choose)
        return checkpoint(model, x, use_reentrant=False, preserve_rng_state=False, context_fn=context)

    def params(self) -> dict[str, Any]:
        return {"policy": self.policy}
