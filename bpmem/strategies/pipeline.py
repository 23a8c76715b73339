"""The pipelines, ``pipeline-gpipe``, ``pipeline-1f1b`` and ``pipeline-interleaved``: the chain cut
into stages over the ranks (``torch.distributed.pipelining``), the batch into ``microbatches``.

A rank keeps a contiguous run of units (two runs for the interleaved schedule) and, on the
first and last stage, the batch and the labels. The schedule's loss is each micro-batch's
mean, and ``scale_grads`` divides the summed gradients by m (the global mean for equal
micro-batches); each rank then adds its own weights' share of s and back-propagates it.
``bpmem.analytic.schedules`` predicts what each rank keeps; the bubble is (p - 1) / (v m + p - 1)
for v local stages per rank.

Your own model (``--model``) pipelines where it is an ``nn.Sequential``: the stages are slices
of its children, as even in count as they go (``bpmem.strategies.user_split``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from bpmem.analytic.planner import uniform_plan
from bpmem.analytic.rules import units_state_bytes
from bpmem.analytic.schedules import (
    INTERLEAVED_LOCAL_STAGES,
    interleaved_rounds,
    pipeline_comm_bytes,
    pipeline_saved_bytes,
    ranks_stages,
    stage_count,
    stage_units,
)
from bpmem.figures import RankFigures
from bpmem.strategies.base import SplitConfig, has_arithmetic, parameter, strategy

if TYPE_CHECKING:
    from bpmem.models.workload import Workload
    from bpmem.spec import MLPSpec, StepSpec


@dataclass(frozen=True)
class PipelineConfig(SplitConfig):
    """A pipeline schedule over ``world_size`` ranks with ``microbatches`` micro-batches."""

    microbatches: int = parameter(4, "K", "micro-batches per step")
    schedule: ClassVar[str] = "gpipe"
    label_params: ClassVar[tuple[str, ...] | None] = ("microbatches", "world_size")
    # receive buffers, gradients sent back and the schedule's order are the library's: each
    # rank's peak comes from a dry run of that rank (setup_dry_rank)
    peak_by_dry_run: ClassVar[bool] = True

    @property
    def local_stages(self) -> int:
        return 1

    def check_model(self, spec: MLPSpec | Workload) -> None:
        super().check_model(spec)
        self.chain_length(spec)
        if getattr(spec, "loss", "") == "none":  # the last stage computes the loss from its micro-batch's target
            raise ValueError(f"loss: {self.name} computes the loss on the last stage from a target; allowed: "
                             "cross_entropy, mse")

    def chain_length(self, spec: MLPSpec | Workload) -> int:
        """The units the stages are cut from: the MLP's depth + 1, or the children of your own
        ``nn.Sequential`` model (anything else is refused, naming what is needed)."""
        if has_arithmetic(spec):
            return spec.depth + 1
        from bpmem.strategies.user_split import sequential_length

        return sequential_length(spec, self.name)

    def stage_ranges(self, spec: MLPSpec | Workload) -> list[tuple[int, int]]:
        """[start, end) units of each stage, as even as the chain allows."""
        if has_arithmetic(spec):
            return stage_units(spec, self)
        return [(s.start, s.end) for s in uniform_plan(self.chain_length(spec), stage_count(self))]

    def check(self, spec: MLPSpec | Workload, step: StepSpec) -> None:
        p, m = self.world_size, self.microbatches
        stages = stage_count(self)
        self.check_model(spec)
        units = self.chain_length(spec)
        if units < stages and has_arithmetic(spec):
            raise ValueError(f"depth: {spec.depth} gives {units} units, fewer than the {stages} stages "
                             f"of {self.name} on {p} ranks; allowed: depth >= {stages - 1}")
        if units < stages:
            raise ValueError(f"model: {spec.name} has {units} children, fewer than the {stages} stages of "
                             f"{self.name} on {p} ranks; allowed: an nn.Sequential of at least {stages} children")
        if step.batch_size % m:
            raise ValueError(f"batch_size: {step.batch_size} does not split into {m} equal "
                             "micro-batches; allowed: a multiple of microbatches")

    def predict_ranks(self, spec: MLPSpec, step: StepSpec) -> list[RankFigures]:
        p, m, b = self.world_size, self.microbatches, step.batch_size
        ranges = stage_units(spec, self)
        out = []
        for rank in range(p):
            mine = ranks_stages(self, rank)
            kept, textbook = pipeline_saved_bytes(spec, self, b, rank)
            out.append(RankFigures(**units_state_bytes(spec, step.optimizer, [ranges[k] for k in mine]),
                                   saved_activation_bytes=kept, textbook_saved_bytes=textbook,
                                   bubble_fraction=(p - 1) / (len(mine) * m + p - 1),
                                   comm_bytes=pipeline_comm_bytes(spec, self, b, rank)))
        return out

    def schedule_ranks(self) -> list[RankFigures]:
        p, m = self.world_size, self.microbatches
        return [RankFigures(bubble_fraction=(p - 1) / (self.local_stages * m + p - 1)) for _ in range(p)]

    def owned_parameters(self, spec: MLPSpec | Workload, rank: int) -> list[int]:
        if not has_arithmetic(spec):
            from bpmem.strategies.user_split import owned_indices

            ranges = self.stage_ranges(spec)
            return owned_indices(spec, [ranges[k] for k in ranks_stages(self, rank)])
        per_unit = 2 if spec.bias else 1
        ranges = stage_units(spec, self)
        return [i for stage in ranks_stages(self, rank)
                for i in range(ranges[stage][0] * per_unit, ranges[stage][1] * per_unit)]

    def make_schedule(self, stages: list[Any], loss_fn: Any) -> Any:
        from torch.distributed import pipelining

        kind = {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B}[self.schedule]
        return kind(stages[0], n_microbatches=self.microbatches, loss_fn=loss_fn)

    def setup_dry_rank(self, spec: MLPSpec | Workload, step: StepSpec, rank: int, device: Any) -> Any:
        """``setup_rank`` for a dry run in a process group that does not communicate: every
        stage is told its input and output shapes up front, as a real stage learns them from
        its neighbours over the group on the first step (``bpmem.predict.rank_dry_run``)."""
        return self.setup_rank(spec, step, rank, device, shapes_up_front=True)

    def setup_rank(self, spec: MLPSpec | Workload, step: StepSpec, rank: int, device: Any,
                   shapes_up_front: bool = False) -> Any:
        from torch import nn
        from torch.distributed.pipelining import PipelineStage

        from bpmem.models.mlp import as_workload
        from bpmem.strategies.rank_runtime import RankSetup

        workload = as_workload(spec)
        model = workload.build(device, seed=0)  # seeded: every rank builds the same weights, keeps its stages
        # the MLP's units; your own nn.Sequential's children, which are its forward
        chain = workload.blocks(model) if has_arithmetic(workload) else [[child] for child in model.children()]
        del model
        x, y = workload.make_batch(step.batch_size, device, seed=0)
        ranges = self.stage_ranges(spec)
        n_stages = len(ranges)
        mine = ranks_stages(self, rank)
        modules = [nn.Sequential(*[m for unit in chain[a:b] for m in unit]) for a, b in (ranges[i] for i in mine)]
        examples = stage_examples(chain, ranges, x, self.microbatches) if shapes_up_front else None
        del chain
        stages = [PipelineStage(module, index, n_stages, device, **(examples[index] if examples else {}))
                  for module, index in zip(modules, mine, strict=True)]
        if examples:
            from bpmem.torch_private import pipeline_stages_static

            pipeline_stages_static(stages)
        schedule = self.make_schedule(stages, workload.data_loss)
        first, last = 0 in mine, n_stages - 1 in mine
        x_local, y_local = (x if first else None), (y if last else None)
        del x, y

        def run(phase: Any) -> None:
            with phase("forward"):  # the schedule interleaves forward and backward inside step()
                losses: list[Any] = []
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
                reg = workload.regularizer(nn.ModuleList(modules))
                if reg is not None:
                    reg.backward()
                del reg  # as a temporary would: s dies with its backward

        params = [p for module in modules for p in module.parameters()]
        inputs = [t for t in (x_local, y_local) if t is not None]
        return RankSetup(modules, params, x_local, y_local, run, inputs)


def stage_examples(chain: list[list[Any]], ranges: list[tuple[int, int]], x: Any,
                   microbatches: int) -> list[dict[str, Any]]:
    """Each stage's ``input_args`` and ``output_args`` for one micro-batch: fake tensors of the
    shapes that flow between the stages (no data, no memory). A stage's input after the first
    needs a gradient, as the activation it receives does."""
    import torch

    from bpmem.torch_private import fake_tensor_mode

    if not isinstance(x, torch.Tensor):
        raise ValueError("model: the dry run of a pipeline needs one input tensor; allowed: measure it under torchrun")
    examples = []
    with fake_tensor_mode() as mode:
        flowing = mode.from_tensor(x[: x.shape[0] // microbatches])
        for index, (start, end) in enumerate(ranges):
            given = flowing.detach().requires_grad_(index > 0)
            flowing = given
            for unit in chain[start:end]:
                for module in unit:
                    flowing = module(flowing)
            examples.append({"input_args": given, "output_args": flowing})
    return examples


@strategy("pipeline-gpipe", "GPipe: all forwards, then all backwards (torchrun; --microbatches)")
class PipelineGPipe(PipelineConfig):
    """GPipe (Huang et al. 2019): every micro-batch in flight on every stage at the turn."""


@strategy("pipeline-1f1b", "1F1B: at most p - r micro-batches in flight on stage r (torchrun)", schedule="1f1b")
class Pipeline1F1B(PipelineConfig):
    def check(self, spec: MLPSpec, step: StepSpec) -> None:
        super().check(spec, step)
        if self.microbatches < self.world_size:
            raise ValueError(f"microbatches: {self.microbatches} is fewer than the {self.world_size} stages; "
                             f"{self.name} needs microbatches >= world_size")


@strategy("pipeline-interleaved", "interleaved 1F1B: two stages per rank, a smaller bubble (torchrun)",
          schedule="interleaved")
class PipelineInterleaved(Pipeline1F1B):
    @property
    def local_stages(self) -> int:
        return INTERLEAVED_LOCAL_STAGES

    def check(self, spec: MLPSpec, step: StepSpec) -> None:
        super().check(spec, step)
        rounds = interleaved_rounds(self.microbatches, self.world_size)[0]
        if self.microbatches % rounds:
            raise ValueError(f"microbatches: {self.microbatches} does not split into {rounds} equal rounds of "
                             f"the interleaved schedule on {self.world_size} ranks; allowed: a multiple of "
                             f"max(1, microbatches // world_size)")

    def make_schedule(self, stages: list[Any], loss_fn: Any) -> Any:
        from torch.distributed.pipelining import ScheduleInterleaved1F1B

        return ScheduleInterleaved1F1B(stages, n_microbatches=self.microbatches, loss_fn=loss_fn)
