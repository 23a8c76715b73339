"""What every rank of a split strategy shares at runtime, under ``torch.distributed`` (the seed's
exercise 5): the rank's setup record, its rows of the batch, the objective step, the
regulariser over sharded weights, and the checks of its gradients against one device.

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

Your own model (``--model``) has no s (its workload's regulariser is None), so J = L: DDP and
FSDP split its rows as above, its inputs a tensor or a tuple of them; a pipeline cuts the
children of an ``nn.Sequential`` (``bpmem.strategies.user_split``).

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

from bpmem.models.batch import map_tensors
from bpmem.models.mlp import add_regularizer, as_workload
from bpmem.models.workload import Workload
from bpmem.spec import MLPSpec, StepSpec


@dataclass
class RankSetup:
    """What one rank holds and how it runs a step."""

    modules: list[nn.Module]  # the rank's stage modules, or the DDP/FSDP/TP-wrapped model
    params: list[nn.Parameter]  # DTensors for fsdp and tensor-parallel
    x: Any  # this rank's inputs: a tensor, a tuple of them (your own model's), or None
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


def local_rows(x: Any, y: Any, rank: int, world_size: int) -> tuple[Any, Any]:
    """This rank's 1/p of the rows of the inputs (a tensor, or a tuple of them: your own
    model's) and of the target (None stays None), as fresh tensors (not views keeping the
    global batch)."""

    def mine(tensor: Any) -> Any:
        rows = tensor.shape[0] // world_size
        return tensor[rank * rows:(rank + 1) * rows].clone()

    return map_tensors(x, mine), map_tensors(y, mine)


def objective_step(spec: MLPSpec | Workload, forward: nn.Module, weights: nn.Module, x: Any, y: Any) -> Any:
    """The step of the strategies that run the whole model on every rank (DDP, FSDP, TP):
    J = L + s forward through ``forward`` (the wrapper), s over ``weights``, then backward.
    Under FSDP and TP the weights are DTensors: the workload's s gathers their square sums."""
    workload = as_workload(spec)

    def run(phase: Any) -> None:
        with phase("forward"):
            # the workload's forward: a tuple of inputs goes in positionally (your own model's)
            objective = add_regularizer(workload.data_loss(workload.forward(forward, x), y),
                                        workload.regularizer(weights))
        with phase("backward"):
            objective.backward()

    return run


def mesh(device: torch.device, world_size: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


def reference_gradients(spec: MLPSpec | Workload, step: StepSpec, device: torch.device) -> list[torch.Tensor]:
    """The single-device step's gradients on the same global batch, in build order."""
    from bpmem.measurement.step import forward_objective

    workload = as_workload(spec)
    model = workload.build(device, seed=0)
    x, y = workload.make_batch(step.batch_size, device, seed=0)
    forward_objective(workload, model, x, y).backward()
    return [p.grad for p in model.parameters()]


def full_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each DTensor gathered whole (a collective: every rank calls it); plain tensors as they are."""
    from torch.distributed.tensor import DTensor

    return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


def max_relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    errors = [((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for g, w in zip(got, want, strict=True)]
    return max(errors, default=0.0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def live_step(setup: RankSetup, optimizer: torch.optim.Optimizer, transient: list[torch.Tensor]) -> Any:
    """The live probe over one whole step of this rank (zero_grad, its share of forward and
    backward, the optimizer step), from the state the steps before it left. FSDP's
    all-gathered parameters (``transient``) live in storages it resizes in place, step after
    step: the probe reads their size after every op."""
    from bpmem.measurement.cell import optimizer_state_tensors
    from bpmem.probes import LiveTensorProbe

    live = LiveTensorProbe({"params": setup.params, "grads": [p.grad for p in setup.params],
                            "optimizer": optimizer_state_tensors(optimizer), "inputs": setup.inputs},
                           record_timeline=False, resizable={"gathered_params": transient})
    with live:
        with live.phase("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        setup.run(live.phase)
        with live.phase("optimizer_step"):
            optimizer.step()
    return live
