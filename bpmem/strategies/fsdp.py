"""``fsdp``: FSDP2, one ``fully_shard`` per Linear (its own all-gather/reduce-scatter group),
then the root; each rank keeps 1/p of the rows and a dim-0 shard of every parameter. Your own
model (``--model``): one unit per ordered block that holds parameters (``workload.blocks``),
then the root; a model without blocks is one unit, the root (``bpmem.strategies.user_split``).

The data loss is as for DDP (FSDP reduce-scatters the averaged gradients of the
all-gathered parameters). s is computed on the sharded weights (DTensors), outside the
forward: ``w.pow(2).sum()`` is a Partial DTensor and ``full_tensor()`` all-reduces it, so
every rank adds the full s; its gradient reaches the sharded weight directly (not through
the reduce-scatter, so it is not averaged) and is lambda times the local shard.

Prediction, every figure but the peak exact:

- Parameters: each weight and bias is its own padded shard of ceil(fan_out / p) rows (FSDP2
  allocates the padding; the rank's rows are a view of it).
- Gradients: the regulariser's gradient reaches the sharded weight first (autograd runs
  AccumulateGrad as soon as it can, before the Linear's reduce-scatter), so the weight's
  gradient is a fresh tensor of the rank's unpadded rows into which FSDP then adds the
  reduce-scattered data gradient. A bias has no regulariser term: its gradient is a view of
  the Linear's reduce-scatter output (the padded weight and bias shards, one buffer), which
  it keeps alive whole.
- Optimizer state: the size of the rank's unpadded rows (``clone``/``zeros_like`` of the view).
- Retained activations: the plain step at B/p rows, as for DDP. FSDP saves nothing of its
  own; the all-gathered weights the Linears save are parameters (excluded).
- All-gathered parameters: one Linear's at a time (no prefetch overlaps two), so at most the
  largest unit's whole weight and bias, padded rows included (``gathered_bytes``).
- Traffic: per Linear, an all-gather in forward and again in backward, and a reduce-scatter
  of the gradients, each (p - 1) padded shards per rank; plus an all-reduce of each weight's
  square sum for s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bpmem.analytic.rules import optimizer_state_bytes, parameter_tensors
from bpmem.figures import RankFigures
from bpmem.strategies.base import has_arithmetic, strategy
from bpmem.strategies.ddp import DataParallelConfig

if TYPE_CHECKING:
    from bpmem.models.workload import Workload
    from bpmem.spec import MLPSpec, StepSpec


def fsdp_shard_rows(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """(rows this rank holds, rows of its padded shard) of a dim 0 of ``rows`` under FSDP2,
    which splits like ``torch.chunk``: ceil(rows / p) each, the last ones shorter or empty,
    every rank's shard padded to ceil(rows / p) rows."""
    padded = -(-rows // world_size)
    return max(0, min(padded, rows - rank * padded)), padded


@strategy("fsdp", "FSDP2: every parameter sharded over the ranks, B/p rows each (torchrun)", peak_by_dry_run=True)
class FSDP(DataParallelConfig):
    def predict_ranks(self, spec: MLPSpec, step: StepSpec) -> list[RankFigures]:
        s, p = spec.itemsize, self.world_size
        local = self.local_plain(spec, step)
        # one unit all-gathered at a time: the largest Linear whole (weight and bias), each
        # rank's padded shard gathered, so p * ceil(fan_out / p) rows
        gathered = max((fan_in + 1 if spec.bias else fan_in) * p * fsdp_shard_rows(fan_out, 0, p)[1] * s
                       for fan_in, fan_out in spec.layer_dims())
        ranks = []
        for rank in range(p):
            params = grads = state = 0
            for fan_in, fan_out in spec.layer_dims():
                held, padded = fsdp_shard_rows(fan_out, rank, p)
                params += padded * fan_in * s + (padded * s if spec.bias else 0)
                grads += held * fan_in * s + (padded * (fan_in + 1) * s if spec.bias else 0)
                state += held * (fan_in + (1 if spec.bias else 0)) * s
            ranks.append(RankFigures(
                params_bytes=params, grads_bytes=grads,
                optimizer_bytes=optimizer_state_bytes(step.optimizer, state, parameter_tensors(spec)),
                gathered_bytes=gathered, saved_activation_bytes=local.saved_activation_bytes,
                textbook_saved_bytes=local.saved_activation_bytes, bubble_fraction=0.0,
                comm_bytes=3 * (p - 1) * params + (spec.depth + 1) * 2 * (p - 1) * s // p))
        return ranks

    def setup_rank(self, spec: MLPSpec | Workload, step: StepSpec, rank: int, device: Any) -> Any:
        from torch import nn
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        from bpmem.models.batch import batch_tensors
        from bpmem.models.mlp import as_workload
        from bpmem.strategies.rank_runtime import RankSetup, local_rows, mesh, objective_step
        from bpmem.strategies.user_split import fsdp_units

        workload = as_workload(spec)
        model = workload.build(device, seed=0)  # seeded: every rank shards the same weights
        device_mesh = mesh(device, self.world_size)
        # the MLP: one unit per Linear; your own model: one per ordered block (or none), then the root
        units = ([m for m in model if isinstance(m, nn.Linear)] if has_arithmetic(workload)
                 else fsdp_units(workload, model))
        for unit in units:
            fully_shard(unit, mesh=device_mesh)
        fully_shard(model, mesh=device_mesh)
        x_local, y_local = local_rows(*workload.make_batch(step.batch_size, device, seed=0), rank, self.world_size)
        run = objective_step(spec, model, model, x_local, y_local)

        def transient_params() -> list[Any]:
            # FSDP2 all-gathers each Linear's parameters into buffers it allocates once and then
            # frees and re-allocates by resizing the same storage (to 0 after forward/backward,
            # to full size before). The Linear saves views of them (W.t()), which are parameters,
            # not activations. ``unshard()`` registers those very unsharded parameters on the
            # module, so their storages can be named (and excluded) up front, before any is
            # counted; a later step's all-gathers land in the same storages again.
            # A unit's parameters that are not DTensors while it alone is unsharded are its own
            # gathered ones (the units inside it stay sharded); the root gathers what no block holds.
            held: list[Any] = []
            for unit in [*units, model]:
                unit.unshard()
                held.extend(p for p in unit.parameters() if not isinstance(p, DTensor))
                unit.reshard()
            return held

        return RankSetup([model], list(model.parameters()), x_local, y_local, run, batch_tensors(x_local, y_local),
                         transient_params)
