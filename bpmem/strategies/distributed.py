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
from bpmem.strategies.schedules import (
    PIPELINES,
    interleaved_rounds,
    pipeline_comm_bytes,
    pipeline_saved_bytes,
    ranks_stages,
    stage_count,
    stage_units,
)

DATA_PARALLEL: tuple[str, ...] = ("ddp", "fsdp")  # each rank takes 1/p of the rows
DISTRIBUTED: tuple[str, ...] = (*PIPELINES, *DATA_PARALLEL, "tensor-parallel")


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
        rounds = interleaved_rounds(step.microbatches, world_size)[0] if step.strategy == "pipeline-interleaved" else 1
        if step.microbatches % rounds:
            raise ValueError(f"microbatches: {step.microbatches} does not split into {rounds} equal rounds of "
                             f"the interleaved schedule on {world_size} ranks; allowed: a multiple of "
                             f"max(1, microbatches // world_size)")
    if step.strategy in DATA_PARALLEL and step.batch_size % world_size:
        raise ValueError(f"batch_size: {step.batch_size} does not split evenly over {world_size} ranks; "
                         "allowed: a multiple of world_size")
    if step.strategy == "tensor-parallel" and spec.hidden_dim % world_size:
        raise ValueError(f"hidden_dim: {spec.hidden_dim} does not split evenly over {world_size} ranks for "
                         "tensor-parallel (each rank keeps hidden_dim / world_size features); "
                         "allowed: a multiple of world_size")


def tensor_parallel_styles(spec: MLPSpec) -> list[str]:
    """How each Linear is split: "colwise", "rowwise", alternating in pairs from the input
    side; with an odd number of Linears the last (the output layer) stays "replicated"
    (every rank holds it whole and computes it on the all-reduced input)."""
    n = spec.depth + 1
    return [("colwise", "rowwise")[j % 2] if j < n - n % 2 else "replicated" for j in range(n)]


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


def predict_rank(spec: MLPSpec, step: StepSpec, rank: int, world_size: int) -> dict[str, Any]:
    """Per-rank predictions: this rank's parameters, its retained activations, bubble, traffic.

    Pipelines: ``bpmem.strategies.schedules.pipeline_saved_bytes`` gives both the textbook
    figure (micro-batches in flight) and what the schedule really keeps (receive buffers,
    outputs held by sends, the last stage's outputs), the latter exact for every schedule;
    both are reported. DDP keeps a full replica and the plain step's activations for
    its B/p rows; its gradients travel in an all-reduce of the whole gradient, through
    buckets that hold a second copy of every gradient for DDP's whole life. Its peak is
    predicted as the plain step's at B/p plus the buckets: an estimate, measured exact where
    the peak falls in backward; where it falls in the optimizer step, the rank also still
    holds one 4-byte scalar per parameter, made by a ``mul`` in backward (DDP's; not
    modelled), and no longer J (4 B), which the rank frees before stepping. Only DDP has
    a peak prediction.

    FSDP and tensor parallelism: see ``_predict_fsdp`` and ``_predict_tensor_parallel``
    (parameters, gradients, optimizer state and retained activations exact; traffic is the
    ring-collective count, not measured).
    """
    from dataclasses import replace

    from bpmem.estimate import estimate

    p, b = world_size, step.batch_size
    if step.strategy == "fsdp":
        return _predict_fsdp(spec, step, rank, world_size)
    if step.strategy == "tensor-parallel":
        return _predict_tensor_parallel(spec, step, world_size)
    if step.strategy == "ddp":
        local = estimate(spec, replace(step, strategy="none", batch_size=b // p, world_size=1))
        grads = local.grads_bytes
        return {"params_bytes": local.params_bytes, "grads_bytes": grads, "optimizer_bytes": local.optimizer_bytes,
                "saved_activation_bytes": local.saved_activation_bytes,
                "textbook_saved_bytes": local.saved_activation_bytes, "bubble_fraction": 0.0,
                "comm_bytes": 2 * (p - 1) * grads // p,
                # the plain step's peak at B/p plus the buckets: a second copy of every gradient
                "buffer_bytes": grads, "peak_bytes": local.peak_bytes + grads}
    ranges = stage_units(spec, step.strategy, p)
    mine = ranks_stages(step.strategy, rank, p)
    kept, textbook = pipeline_saved_bytes(spec, step, rank, p)
    virtual = len(mine)  # the interleaved schedule's bubble shrinks with its local stages
    return {**units_state_bytes(spec, step, [ranges[stage] for stage in mine]),
            "saved_activation_bytes": kept, "textbook_saved_bytes": textbook,
            "bubble_fraction": (p - 1) / (virtual * step.microbatches + p - 1),
            "comm_bytes": pipeline_comm_bytes(spec, step, rank, p)}


def fsdp_shard_rows(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """(rows this rank holds, rows of its padded shard) of a dim 0 of ``rows`` under FSDP2,
    which splits like ``torch.chunk``: ceil(rows / p) each, the last ones shorter or empty,
    every rank's shard padded to ceil(rows / p) rows."""
    padded = -(-rows // world_size)
    return max(0, min(padded, rows - rank * padded)), padded


def units_state_bytes(spec: MLPSpec, step: StepSpec, ranges: list[tuple[int, int]]) -> dict[str, int]:
    """Parameters, gradients and optimizer state of the whole units in ``ranges`` ([start,
    end) unit indices): what a pipeline rank or a model-parallel device holds."""
    s = spec.itemsize
    dims = spec.layer_dims()
    params = sum((fan_in * fan_out + (fan_out if spec.bias else 0)) * s
                 for start, end in ranges for fan_in, fan_out in dims[start:end])
    tensors = sum((end - start) * (2 if spec.bias else 1) for start, end in ranges)
    return {"params_bytes": params, "grads_bytes": params, "optimizer_bytes": optimizer_bytes(step, params, tensors)}


def optimizer_bytes(step: StepSpec, state_bytes: int, n_params: int) -> int:
    """Per-parameter state, each tensor the size of the local parameter; Adam adds a 4-byte step."""
    return {"sgd": 0, "sgd-momentum": state_bytes, "adam": 2 * state_bytes + 4 * n_params}[step.optimizer]


def _predict_fsdp(spec: MLPSpec, step: StepSpec, rank: int, world_size: int) -> dict[str, Any]:
    """FSDP2, one ``fully_shard`` per Linear; every figure but the peak exact.

    - Parameters: each weight and bias is its own padded shard of ceil(fan_out / p) rows
      (FSDP2 allocates the padding; the rank's rows are a view of it).
    - Gradients: the regulariser's gradient reaches the sharded weight first (autograd runs
      AccumulateGrad as soon as it can, before the Linear's reduce-scatter), so the weight's
      gradient is a fresh tensor of the rank's unpadded rows into which FSDP then adds the
      reduce-scattered data gradient. A bias has no regulariser term: its gradient is a view
      of the Linear's reduce-scatter output (the padded weight and bias shards, one
      buffer), which it keeps alive whole.
    - Optimizer state: the size of the rank's unpadded rows (``clone``/``zeros_like`` of the
      shard view).
    - Retained activations: the plain step at B/p rows, as for DDP. FSDP saves nothing of
      its own; the all-gathered weights the Linears save are parameters (excluded).
    - All-gathered parameters: one Linear's at a time (no prefetch overlaps two), so at
      most the largest unit's whole weight and bias, padded rows included (``gathered_bytes``).
    - Traffic: per Linear, an all-gather in forward and again in backward, and a
      reduce-scatter of the gradients, each (p - 1) padded shards per rank; plus an all-reduce
      of each weight's square sum for s.
    """
    from dataclasses import replace

    from bpmem.estimate import estimate

    s, p = spec.itemsize, world_size
    params = grads = state = n_params = 0
    for fan_in, fan_out in spec.layer_dims():
        held, padded = fsdp_shard_rows(fan_out, rank, p)
        params += padded * fan_in * s + (padded * s if spec.bias else 0)
        grads += held * fan_in * s + (padded * (fan_in + 1) * s if spec.bias else 0)
        state += held * (fan_in + (1 if spec.bias else 0)) * s
        n_params += 2 if spec.bias else 1
    local = estimate(spec, replace(step, strategy="none", batch_size=step.batch_size // p, world_size=1))
    weights = spec.depth + 1
    return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": optimizer_bytes(step, state, n_params),
            # one unit all-gathered at a time: the largest Linear whole (weight and bias), each
            # rank's padded shard gathered, so p * ceil(fan_out / p) rows
            "gathered_bytes": max((fan_in + 1 if spec.bias else fan_in) * p * fsdp_shard_rows(fan_out, 0, p)[1] * s
                                  for fan_in, fan_out in spec.layer_dims()),
            "saved_activation_bytes": local.saved_activation_bytes,
            "textbook_saved_bytes": local.saved_activation_bytes, "bubble_fraction": 0.0,
            "comm_bytes": 3 * (p - 1) * params + weights * 2 * (p - 1) * s // p}


def _predict_tensor_parallel(spec: MLPSpec, step: StepSpec, world_size: int) -> dict[str, Any]:
    """Tensor parallelism in colwise/rowwise pairs (``tensor_parallel_styles``); every figure
    but the peak exact, the same on every rank.

    - Parameters, gradients, optimizer state: a colwise Linear keeps fan_out / p rows of its
      weight and bias; a rowwise one fan_in / p columns of its weight and the whole bias; an
      unpaired last Linear is whole.
    - Retained activations: the plain step's at the whole batch B, except that what lies
      between a colwise Linear and its rowwise partner is (B, hidden / p): the colwise output
      (GELU saves it) and the activation's output (the rowwise Linear saves it; ReLU, tanh and
      sigmoid save it too). The rowwise output is all-reduced, whole, on every rank.
    - Traffic: ring all-reduces, 2 (p - 1) / p of the bytes per rank: each rowwise output in
      forward, the gradient of each colwise input in backward (none for X), and each sharded
      weight's square sum for s.
    """
    from bpmem.strategies.checkpointing import chain_costs, loss_bytes

    s, p, b = spec.itemsize, world_size, step.batch_size
    styles = tensor_parallel_styles(spec)
    costs = chain_costs(spec, b)
    params = n_params = retained = reduced = 0
    for j, ((fan_in, fan_out), style) in enumerate(zip(spec.layer_dims(), styles, strict=True)):
        weight, bias = fan_in * fan_out, (fan_out if spec.bias else 0)
        if style == "colwise":
            weight, bias = weight // p, bias // p
            reduced += costs.boundary_bytes[j] if j > 0 else 0
        elif style == "rowwise":
            weight //= p
            reduced += b * fan_out * s
        params += (weight + bias) * s
        n_params += 2 if spec.bias else 1
        sharded_input = j > 0 and styles[j - 1] == "colwise"
        retained += costs.boundary_bytes[j] // (p if sharded_input else 1)
        retained += costs.internal_bytes[j] // (p if style == "colwise" else 1)
    retained += loss_bytes(spec, b)
    reduced += sum(style != "replicated" for style in styles) * s
    return {"params_bytes": params, "grads_bytes": params, "optimizer_bytes": optimizer_bytes(step, params, n_params),
            "saved_activation_bytes": retained, "textbook_saved_bytes": retained, "bubble_fraction": 0.0,
            "comm_bytes": 2 * (p - 1) * reduced // p}
