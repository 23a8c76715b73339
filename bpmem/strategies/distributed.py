"""Splitting one step over several processes with ``torch.distributed`` (the seed's
exercise 5): pipeline stages, DDP, FSDP2 and tensor parallelism, each run by every rank of
a ``torchrun`` job.

Every rank builds the same model from the same seed and the same global batch, then keeps
its part: DDP keeps a full replica and 1/p of the rows; FSDP keeps 1/p of the rows and a
1/p shard (dim 0) of every parameter; tensor parallelism keeps the whole batch and 1/p of
each hidden layer's features; a pipeline rank keeps a contiguous run of units (two runs
for the interleaved schedule) and, on the first and last stage, the batch and the labels.
The objective stays J = L + s on the global batch:

- DDP: each rank's loss is the mean over its rows and DDP averages gradients over ranks,
  which is the global mean when the rows split evenly; every rank adds the full s, and the
  average of p equal gradients is that gradient.
- FSDP: the data loss is as for DDP (FSDP reduce-scatters the averaged gradients of the
  all-gathered parameters). s is computed on the sharded weights (DTensors), outside the
  forward: ``w.pow(2).sum()`` is a Partial DTensor and ``full_tensor()`` all-reduces it,
  so every rank adds the full s; its gradient reaches the sharded weight directly (not
  through the reduce-scatter, so it is not averaged) and is lambda times the local shard.
- Tensor parallel: every rank runs the whole batch and the same replicated loss; each
  rank's gradient is exact for its shard, no averaging. s as for FSDP.
- Pipelines: the schedule's loss is each micro-batch's mean, and ``scale_grads`` divides
  the summed gradients by m (the global mean for equal micro-batches); each rank then adds
  its own weights' share of s and back-propagates it.

Parameters and gradients of FSDP and tensor parallelism are DTensors: the probes count
their local shards (``bpmem.probes.local_tensor``); ``full_tensors`` gathers them whole for
the equivalence check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bpmem.model import build, data_loss, make_batch, weight_matrices
from bpmem.spec import MLPSpec, StepSpec
from bpmem.strategies.checkpointing import units
from bpmem.strategies.distributed_predict import DATA_PARALLEL, tensor_parallel_styles
from bpmem.strategies.schedules import (
    ranks_stages,
    stage_units,
)


@dataclass
class RankSetup:
    """What one rank holds and how it runs a step."""

    modules: list[nn.Module]  # the rank's stage modules, or the DDP/FSDP/TP-wrapped model
    params: list[nn.Parameter]  # DTensors for fsdp and tensor-parallel
    x: torch.Tensor | None
    y: torch.Tensor | None
    run: Any  # callable(phase) -> None: one training step without the optimizer
    inputs: list[torch.Tensor]
    # callable() -> tensors whose storages hold parameters only during a step (FSDP's
    # all-gathered unsharded parameters); collective, so every rank calls it, after one step
    transient_params: Any = field(default=lambda: [])
    # callable() -> bytes of communication buffers the wrapper allocated for its whole life,
    # out of sight of the probes (DDP's gradient buckets); read after a step, as DDP
    # rebuilds its buckets after the first one
    buffer_bytes: Any = field(default=lambda: 0)


def setup_rank(spec: MLPSpec, step: StepSpec, rank: int, world_size: int, device: torch.device) -> RankSetup:
    """Build this rank's share of the model and batch, and the step that drives it."""
    model = build(spec, device, seed=0)
    x, y = make_batch(spec, step.batch_size, device, seed=0)
    if step.strategy == "ddp":
        return _setup_ddp(spec, model, x, y, rank, world_size, device)
    if step.strategy == "fsdp":
        return _setup_fsdp(spec, model, x, y, rank, world_size, device)
    if step.strategy == "tensor-parallel":
        return _setup_tensor_parallel(spec, model, x, y, world_size, device)
    return _setup_pipeline(spec, step, model, x, y, rank, world_size, device)


def _setup_ddp(spec: MLPSpec, model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int,
               device: torch.device) -> RankSetup:
    from torch.nn.parallel import DistributedDataParallel

    x_local, y_local = _local_rows(x, y, rank, world_size)
    del x, y
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    run = _objective_step(spec, wrapped, model, x_local, y_local)

    def buffer_bytes() -> int:
        # DDP copies each gradient into a flat bucket, all-reduces the bucket and copies the
        # result back (gradient_as_bucket_view=False), so the buckets, allocated in C++ when
        # DDP builds them, hold a second copy of every gradient; DDP reports their sizes
        sizes = wrapped._get_ddp_logging_data().get("bucket_sizes", "")
        return sum(int(size) for size in str(sizes).split(",") if size.strip())

    return RankSetup([wrapped], list(model.parameters()), x_local, y_local, run, [x_local, y_local],
                     buffer_bytes=buffer_bytes)


def _local_rows(x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's 1/p of the rows, as fresh tensors (not views keeping the global batch)."""
    rows = x.shape[0] // world_size
    return x[rank * rows:(rank + 1) * rows].clone(), y[rank * rows:(rank + 1) * rows].clone()


def _objective_step(spec: MLPSpec, forward: nn.Module, weights: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The step of the strategies that run the whole model on every rank (DDP, FSDP, TP):
    J = L + s forward through ``forward`` (the wrapper), s over ``weights``, then backward."""

    def run(phase: Any) -> None:
        with phase("forward"):
            objective = data_loss(spec, forward(x), y) + _regularizer(spec, weights)
        with phase("backward"):
            objective.backward()

    return run


def _regularizer(spec: MLPSpec, module: nn.Module) -> torch.Tensor:
    """s over the weights of ``module``; a DTensor weight's square sum (Partial or Replicate)
    is made whole with ``full_tensor()`` (an all-reduce), so s is a plain tensor on every rank."""
    from torch.distributed.tensor import DTensor

    squares = []
    for w in weight_matrices(module):
        square = w.pow(2).sum()
        squares.append(square.full_tensor() if isinstance(square, DTensor) else square)
    return torch.stack(squares).sum() * (spec.l2 / 2)


def _mesh(device: torch.device, world_size: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


def _setup_fsdp(spec: MLPSpec, model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int,
                device: torch.device) -> RankSetup:
    """FSDP2: one ``fully_shard`` per Linear (its own all-gather/reduce-scatter group), then
    the root; parameters become DTensors sharded on dim 0."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device, world_size)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for linear in linears:
        fully_shard(linear, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x_local, y_local = _local_rows(x, y, rank, world_size)
    del x, y

    run = _objective_step(spec, model, model, x_local, y_local)

    def transient_params() -> list[torch.Tensor]:
        # FSDP2 all-gathers each Linear's parameters into buffers it allocates once and then
        # frees and re-allocates by resizing the same storage (to 0 after forward/backward, to
        # full size before). The Linear saves views of them (W.t()), which are parameters, not
        # activations. ``unshard()`` registers those very unsharded parameters on the module,
        # so their storages can be named (and excluded) up front, before any is counted; a
        # later step's all-gathers land in the same storages again.
        held: list[torch.Tensor] = []
        for linear in linears:
            linear.unshard()
            held.extend(linear.parameters(recurse=False))
            linear.reshard()
        return held

    return RankSetup([model], list(model.parameters()), x_local, y_local, run, [x_local, y_local], transient_params)


def _setup_tensor_parallel(spec: MLPSpec, model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, world_size: int,
                           device: torch.device) -> RankSetup:
    """Megatron-style pairs: a colwise Linear (weight and bias sharded on the output
    features; its output stays sharded on the feature dim, and so does the elementwise
    activation), then a rowwise Linear (weight sharded on the input features, bias
    replicated; its partial outputs are all-reduced). Every rank runs the whole batch."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = _mesh(device, world_size)
    linears = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[style]() for name, style in zip(linears, tensor_parallel_styles(spec), strict=True)
            if style in styles}
    parallelize_module(model, mesh, plan)

    run = _objective_step(spec, model, model, x, y)
    return RankSetup([model], list(model.parameters()), x, y, run, [x, y])


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


def full_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each DTensor gathered whole (a collective: every rank calls it); plain tensors as they are."""
    from torch.distributed.tensor import DTensor

    return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


def max_relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    errors = [((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for g, w in zip(got, want, strict=True)]
    return max(errors, default=0.0)


def owned_parameter_indices(spec: MLPSpec, step: StepSpec, rank: int, world_size: int) -> list[int]:
    """Positions, in ``build(spec).parameters()`` order, of the parameters this rank trains."""
    per_unit = 2 if spec.bias else 1
    if step.strategy in (*DATA_PARALLEL, "tensor-parallel"):  # a replica, or a shard of every parameter
        return list(range((spec.depth + 1) * per_unit))
    ranges = stage_units(spec, step.strategy, world_size)
    return [i for stage in ranks_stages(step.strategy, rank, world_size)
            for i in range(ranges[stage][0] * per_unit, ranges[stage][1] * per_unit)]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
