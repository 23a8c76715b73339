"""Splitting one step over several processes with ``torch.distributed`` (the seed's
exercise 5): pipeline stages and DDP, each run by every rank of a ``torchrun`` job.

Every rank builds the same model from the same seed and the same global batch, then keeps
its part: DDP keeps a full replica and 1/p of the rows; a pipeline rank keeps a contiguous
run of units (two runs for the interleaved schedule) and, on the first and last stage, the
batch and the labels. The objective stays J = L + s on the global batch:

- DDP: each rank's loss is the mean over its rows and DDP averages gradients over ranks,
  which is the global mean when the rows split evenly; every rank adds the full s, and the
  average of p equal gradients is that gradient.
- Pipelines: the schedule's loss is each micro-batch's mean, and ``scale_grads`` divides
  the summed gradients by m (the global mean for equal micro-batches); each rank then adds
  its own weights' share of s and back-propagates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bpmem.model import build, data_loss, make_batch, weight_matrices
from bpmem.spec import MLPSpec, StepSpec
from bpmem.strategies.checkpointing import units
from bpmem.strategies.planner import uniform_plan

PIPELINES: tuple[str, ...] = ("pipeline-gpipe", "pipeline-1f1b", "pipeline-interleaved")
DISTRIBUTED: tuple[str, ...] = (*PIPELINES, "ddp")


def stage_count(strategy: str, world_size: int) -> int:
    """Pipeline stages: one per rank, two per rank for the interleaved schedule."""
    return 2 * world_size if strategy == "pipeline-interleaved" else world_size


def stage_units(spec: MLPSpec, strategy: str, world_size: int) -> list[tuple[int, int]]:
    """[start, end) unit ranges of each stage, as even as the chain allows."""
    return [(s.start, s.end) for s in uniform_plan(spec.depth + 1, stage_count(strategy, world_size))]


def ranks_stages(strategy: str, rank: int, world_size: int) -> list[int]:
    """Stage indices this rank runs (the interleaved schedule loops: r, r + p)."""
    return [rank, rank + world_size] if strategy == "pipeline-interleaved" else [rank]


def check(spec: MLPSpec, step: StepSpec, world_size: int) -> None:
    """Raise ValueError for a cell no schedule can run, naming the field."""
    if world_size < 2:
        raise ValueError(f"world_size: {world_size} is not allowed for {step.strategy}; allowed: >= 2")
    if step.strategy in PIPELINES:
        stages = stage_count(step.strategy, world_size)
        if spec.depth + 1 < stages:
            raise ValueError(f"depth: {spec.depth} gives {spec.depth + 1} units, fewer than the {stages} stages "
                             f"of {step.strategy} on {world_size} ranks; allowed: depth >= {stages - 1}")
        if step.batch_size % step.microbatches:
            raise ValueError(f"batch_size: {step.batch_size} does not split into {step.microbatches} equal "
                             "micro-batches; allowed: a multiple of microbatches")
        if step.strategy != "pipeline-gpipe" and step.microbatches < world_size:
            raise ValueError(f"microbatches: {step.microbatches} is fewer than the {world_size} stages; "
                             f"{step.strategy} needs microbatches >= world_size")
    if step.strategy == "ddp" and step.batch_size % world_size:
        raise ValueError(f"batch_size: {step.batch_size} does not split evenly over {world_size} ranks; "
                         "allowed: a multiple of world_size")


@dataclass
class RankSetup:
    """What one rank holds and how it runs a step."""

    modules: list[nn.Module]  # the rank's stage modules, or the DDP wrapper
    params: list[nn.Parameter]
    x: torch.Tensor | None
    y: torch.Tensor | None
    run: Any  # callable(phase) -> None: one training step without the optimizer
    inputs: list[torch.Tensor]


def setup_rank(spec: MLPSpec, step: StepSpec, rank: int, world_size: int, device: torch.device) -> RankSetup:
    """Build this rank's share of the model and batch, and the step that drives it."""
    model = build(spec, device, seed=0)
    x, y = make_batch(spec, step.batch_size, device, seed=0)
    if step.strategy == "ddp":
        return _setup_ddp(spec, model, x, y, rank, world_size, device)
    return _setup_pipeline(spec, step, model, x, y, rank, world_size, device)


def _setup_ddp(spec: MLPSpec, model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int,
               device: torch.device) -> RankSetup:
    from torch.nn.parallel import DistributedDataParallel

    rows = x.shape[0] // world_size
    x_local = x[rank * rows:(rank + 1) * rows].clone()
    y_local = y[rank * rows:(rank + 1) * rows].clone()
    del x, y
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def run(phase: Any) -> None:
        with phase("forward"):
            objective = data_loss(spec, wrapped(x_local), y_local) + _regularizer(spec, model)
        with phase("backward"):
            objective.backward()

    return RankSetup([wrapped], list(model.parameters()), x_local, y_local, run, [x_local, y_local])


def _regularizer(spec: MLPSpec, module: nn.Module) -> torch.Tensor:
    weights = weight_matrices(module)
    return torch.stack([w.pow(2).sum() for w in weights]).sum() * (spec.l2 / 2)


def _setup_pipeline(spec: MLPSpec, step: StepSpec, model: nn.Sequential, x: torch.Tensor, y: torch.Tensor,
                    rank: int, world_size: int, device: torch.device) -> RankSetup:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    chain = units(model)
    ranges = stage_units(spec, step.strategy, world_size)
    n_stages = len(ranges)
    mine = ranks_stages(step.strategy, rank, world_size)
    modules = [nn.Sequential(*[m for unit in chain[a:b] for m in unit]) for a, b in (ranges[i] for i in mine)]
    stages = [PipelineStage(module, index, n_stages, device) for module, index in zip(modules, mine, strict=True)]

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return data_loss(spec, output, target)

    if step.strategy == "pipeline-interleaved":
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=step.microbatches, loss_fn=loss_fn)
    else:
        kind = ScheduleGPipe if step.strategy == "pipeline-gpipe" else Schedule1F1B
        schedule = kind(stages[0], n_microbatches=step.microbatches, loss_fn=loss_fn)
    first, last = 0 in mine, n_stages - 1 in mine
    x_local, y_local = (x if first else None), (y if last else None)
    del model
    params = [p for module in modules for p in module.parameters()]

    def run(phase: Any) -> None:
        with phase("forward"):  # the schedule interleaves forward and backward inside step()
            losses: list[torch.Tensor] = []
            if first and last:
                schedule.step(x_local, target=y_local, losses=losses)
            elif first:
                schedule.step(x_local)
            elif last:
                schedule.step(target=y_local, losses=losses)
            else:
                schedule.step()
            del losses
        with phase("backward"):  # this rank's share of the regulariser
            _regularizer(spec, nn.ModuleList(modules)).backward()

    inputs = [t for t in (x_local, y_local) if t is not None]
    return RankSetup(modules, params, x_local, y_local, run, inputs)


def reference_gradients(spec: MLPSpec, step: StepSpec, device: torch.device) -> list[torch.Tensor]:
    """The single-device step's gradients on the same global batch, in build order."""
    from bpmem.step import forward_objective

    model = build(spec, device, seed=0)
    x, y = make_batch(spec, step.batch_size, device, seed=0)
    forward_objective(spec, model, x, y).backward()
    return [p.grad for p in model.parameters()]


def max_relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    errors = [((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for g, w in zip(got, want, strict=True)]
    return max(errors, default=0.0)


def owned_parameter_indices(spec: MLPSpec, step: StepSpec, rank: int, world_size: int) -> list[int]:
    """Positions, in ``build(spec).parameters()`` order, of the parameters this rank trains."""
    per_unit = 2 if spec.bias else 1
    if step.strategy == "ddp":
        return list(range((spec.depth + 1) * per_unit))
    ranges = stage_units(spec, step.strategy, world_size)
    return [i for stage in ranks_stages(step.strategy, rank, world_size)
            for i in range(ranges[stage][0] * per_unit, ranges[stage][1] * per_unit)]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def predict_rank(spec: MLPSpec, step: StepSpec, rank: int, world_size: int) -> dict[str, Any]:
    """Per-rank predictions: this rank's parameters, its retained activations, bubble, traffic.

    Pipelines keep, per micro-batch in flight, each unit's input and internals at the
    micro-batch size (B/m rows) and, on the last stage, the loss internals. On top of the
    textbook count of micro-batches in flight (GPipe m; 1F1B p - r on stage r) the
    implementation keeps:

    - the whole X (first stage) and y (last stage): micro-batches are views of them;
    - every micro-batch's receive buffer on a later stage: ``PipelineStage`` allocates one
      per micro-batch and keeps it for its life, so all m stay alive, in flight or not;
    - in 1F1B's steady state, one more output of the stage, still held by its send;
    - every micro-batch's output on the last stage (the schedule merges them); MSE saves o,
      so there those outputs count as retained.

    Both figures are reported: ``textbook_saved_bytes`` and the prediction of what the
    schedule really keeps. The interleaved schedule's in-flight count is taken as m: an
    upper figure, not exact. DDP keeps a full replica and the plain step's activations for
    its B/p rows; its gradients travel in an all-reduce of the whole gradient.
    """
    from dataclasses import replace

    from bpmem.estimate import estimate
    from bpmem.strategies.checkpointing import chain_costs, loss_bytes

    s, p, b = spec.itemsize, world_size, step.batch_size
    per_unit_params = [(fan_in * fan_out + (fan_out if spec.bias else 0)) * s for fan_in, fan_out in spec.layer_dims()]
    if step.strategy == "ddp":
        local = estimate(spec, replace(step, strategy="none", batch_size=b // p, world_size=1))
        grads = local.grads_bytes
        return {"params_bytes": local.params_bytes, "grads_bytes": grads, "optimizer_bytes": local.optimizer_bytes,
                "saved_activation_bytes": local.saved_activation_bytes,
                "textbook_saved_bytes": local.saved_activation_bytes, "bubble_fraction": 0.0,
                "comm_bytes": 2 * (p - 1) * grads // p}
    m = step.microbatches
    micro = b // m
    costs = chain_costs(spec, micro)
    ranges = stage_units(spec, step.strategy, p)
    n_stages = len(ranges)
    mine = ranks_stages(step.strategy, rank, p)
    params = sum(per_unit_params[j] for stage in mine for j in range(*ranges[stage]))
    fixed = textbook = kept = comm = 0
    for stage in mine:
        start, end = ranges[stage]
        first, last = stage == 0, stage == n_stages - 1
        inner = sum(costs.boundary_bytes[start + 1:end]) + sum(costs.internal_bytes[start:end])
        if not last and spec.activation != "gelu":
            inner += costs.boundary_bytes[end]  # the stage's last activation saves its output
        if last:
            label_row = 8 if spec.loss == "cross_entropy" else spec.output_dim * s
            inner += loss_bytes(spec, micro) - micro * label_row  # y's micro-batch is a view...
            fixed += b * label_row  # ...of the whole y, kept once
        received = 0 if first else costs.boundary_bytes[start]
        if first:
            fixed += b * spec.input_dim * s  # X, whole
        in_flight = {"pipeline-gpipe": m, "pipeline-1f1b": min(m, p - rank)}.get(step.strategy, m)
        textbook += in_flight * (inner + received)
        kept += in_flight * inner + m * received
        if step.strategy == "pipeline-1f1b" and not last and m > p - rank:
            kept += costs.boundary_bytes[end]  # one more output, held by its send
        if last and spec.loss == "mse":
            kept += (m - in_flight) * micro * spec.output_dim * s  # the stage keeps every output o
        comm += (0 if last else m * costs.boundary_bytes[end]) + (0 if first else m * costs.boundary_bytes[start])
    optimizer = {"sgd": 0, "sgd-momentum": params, "adam": 2 * params}[step.optimizer]
    if step.optimizer == "adam":
        optimizer += 4 * sum((2 if spec.bias else 1) * (ranges[stage][1] - ranges[stage][0]) for stage in mine)
    virtual = 2 if step.strategy == "pipeline-interleaved" else 1
    return {"params_bytes": params, "grads_bytes": params, "optimizer_bytes": optimizer,
            "saved_activation_bytes": fixed + kept, "textbook_saved_bytes": fixed + textbook,
            "bubble_fraction": (p - 1) / (virtual * m + p - 1), "comm_bytes": comm}
