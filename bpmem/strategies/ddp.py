"""``ddp``: ``DistributedDataParallel``; every rank keeps a full replica and 1/p of the rows,
of the MLP or of any model of your own (``--model``).

Each rank's loss is the mean over its rows and DDP averages gradients over ranks, which is
the global mean when the rows split evenly; every rank adds the full s, and the average of
p equal gradients is that gradient.

Prediction: the plain step at B/p rows, exact but for the peak. Its gradients travel in an
all-reduce of the whole gradient, through buckets that hold a second copy of every
gradient for DDP's whole life. The peak is predicted as the plain step's at B/p plus the
buckets: exact where the peak falls in backward; where it falls in the optimizer step, the
rank also still holds one 4-byte scalar per parameter, made by a ``mul`` in backward (DDP's;
not modelled), and no longer J (4 B), which the rank frees before stepping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bpmem.analytic.plain_step import plain_estimate
from bpmem.figures import RankFigures
from bpmem.strategies.base import SplitConfig, has_arithmetic, strategy

if TYPE_CHECKING:
    from bpmem.figures import Estimate
    from bpmem.models.workload import Workload
    from bpmem.spec import MLPSpec, StepSpec


@dataclass(frozen=True)
class DataParallelConfig(SplitConfig):
    """Every rank runs the whole model on B/p of the rows (DDP, FSDP)."""

    def check(self, spec: MLPSpec, step: StepSpec) -> None:
        if step.batch_size % self.world_size:
            raise ValueError(f"batch_size: {step.batch_size} does not split evenly over {self.world_size} ranks; "
                             "allowed: a multiple of world_size")

    def owned_parameters(self, spec: MLPSpec | Workload, rank: int) -> list[int]:
        """Every parameter: a whole replica (DDP), a shard of each (FSDP)."""
        if has_arithmetic(spec):
            return super().owned_parameters(spec, rank)
        from bpmem.strategies.user_split import parameter_count

        return list(range(parameter_count(spec)))

    def schedule_ranks(self) -> list[RankFigures]:
        return [RankFigures(bubble_fraction=0.0) for _ in range(self.world_size)]  # no rank waits on another

    def local_plain(self, spec: MLPSpec, step: StepSpec) -> Estimate:
        """The plain step's estimate at a rank's B/p rows."""
        return plain_estimate(spec, dataclasses.replace(step, batch_size=step.batch_size // self.world_size))


@strategy("ddp", "DistributedDataParallel: a replica per rank, B/p rows each (torchrun)")
class DDP(DataParallelConfig):
    def predict_ranks(self, spec: MLPSpec, step: StepSpec) -> list[RankFigures]:
        p = self.world_size
        local = self.local_plain(spec, step)
        grads = local.grads_bytes
        rank = RankFigures(params_bytes=local.params_bytes, grads_bytes=grads, optimizer_bytes=local.optimizer_bytes,
                           saved_activation_bytes=local.saved_activation_bytes,
                           textbook_saved_bytes=local.saved_activation_bytes, bubble_fraction=0.0,
                           comm_bytes=2 * (p - 1) * grads // p, buffer_bytes=grads,
                           peak_bytes=local.peak_bytes + grads)
        return [rank] * p

    def setup_rank(self, spec: MLPSpec | Workload, step: StepSpec, rank: int, device: Any) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        from bpmem.models.batch import batch_tensors
        from bpmem.models.mlp import as_workload
        from bpmem.strategies.rank_runtime import RankSetup, local_rows, objective_step
        from bpmem.torch_private import ddp_bucket_sizes

        workload = as_workload(spec)
        model = workload.build(device, seed=0)  # seeded: every rank's replica starts the same
        x_local, y_local = local_rows(*workload.make_batch(step.batch_size, device, seed=0), rank, self.world_size)
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        run = objective_step(spec, wrapped, model, x_local, y_local)

        def buffer_bytes() -> int:
            # DDP copies each gradient into a flat bucket, all-reduces the bucket and copies the
            # result back (gradient_as_bucket_view=False), so the buckets, allocated in C++ when
            # DDP builds them, hold a second copy of every gradient; DDP reports their sizes
            return sum(ddp_bucket_sizes(wrapped))

        return RankSetup([wrapped], list(model.parameters()), x_local, y_local, run, batch_tensors(x_local, y_local),
                         buffer_bytes=buffer_bytes)
