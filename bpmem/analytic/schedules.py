"""Pipeline schedules, as bpmem predicts them: which stages a rank runs, in what order its
micro-batches go forward and backward, and so how many activations it holds at once.

A stage's costs per micro-batch (B/m rows), from ``chain_costs``:

- ``inner``: what its modules save for one micro-batch, from that micro-batch's forward to
  its backward: each unit's internals, the boundaries inside the stage, the stage's output
  where its last activation saves it (not GELU, which saves its input), and on the last
  stage the loss's internals;
- ``received``: the buffer its input arrives in (none on the first stage). Its first Linear
  saves it, and ``PipelineStage`` keeps one buffer per micro-batch for its whole life, so
  once a micro-batch has gone forward its buffer stays;
- ``held``: what of ``inner`` outlives the backward when the schedule holds on to it (the
  stage's output while its send is in flight; on the last stage under MSE, o, which the
  schedule keeps to merge the outputs).

The whole X (first stage) and y (last stage) are kept once: micro-batches are views of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from bpmem.analytic.planner import uniform_plan
from bpmem.analytic.rules import chain_costs, label_row_bytes, loss_saved_bytes
from bpmem.spec import MLPSpec

INTERLEAVED_LOCAL_STAGES = 2  # the interleaved schedule runs two stages per rank (r and r + p)


class Schedule(Protocol):
    """What the arithmetic needs of a pipeline strategy's config."""

    schedule: str  # "gpipe", "1f1b" or "interleaved"
    microbatches: int
    world_size: int

    @property
    def local_stages(self) -> int: ...


def stage_count(pipe: Schedule) -> int:
    """Pipeline stages: one per rank, two per rank for the interleaved schedule."""
    return pipe.local_stages * pipe.world_size


def even_stages(spec: MLPSpec, stages: int) -> list[tuple[int, int]]:
    """[start, end) unit ranges of ``stages`` stages, as even as the chain allows (the
    pipelines and ``model-parallel`` split alike)."""
    return [(s.start, s.end) for s in uniform_plan(spec.depth + 1, stages)]


def stage_units(spec: MLPSpec, pipe: Schedule) -> list[tuple[int, int]]:
    """[start, end) unit ranges of each stage of the pipeline."""
    return even_stages(spec, stage_count(pipe))


def ranks_stages(pipe: Schedule, rank: int) -> list[int]:
    """Stage indices this rank runs (the interleaved schedule loops: r, r + p)."""
    return [rank + k * pipe.world_size for k in range(pipe.local_stages)]


def interleaved_rounds(microbatches: int, world_size: int) -> tuple[int, int]:
    """(rounds, micro-batches per round) of ``ScheduleInterleaved1F1B``: a rank runs a
    round's micro-batches through one local stage before it moves to the next stage."""
    rounds = max(1, microbatches // world_size)
    return rounds, microbatches // rounds


def interleaved_order(rank: int, world_size: int, microbatches: int) -> list[tuple[str, int]]:
    """The (``"F"`` or ``"B"``, stage) actions of one rank under interleaved 1F1B
    (Narayanan et al. 2021, as ``torch.distributed.pipelining`` orders them), idle slots
    left out.

    Warm-up: (v - 1) micro-batches per round, plus 2 per rank between this one and the
    last, forwards only. Steady state: one forward, one backward. Cool-down: the remaining
    backwards. Forwards walk the local stages upwards a round at a time, backwards downwards.
    """
    v, p, m = INTERLEAVED_LOCAL_STAGES, world_size, microbatches
    _, per_round = interleaved_rounds(m, p)
    total = v * m
    warmup = min((v - 1) * per_round + 2 * (p - 1 - rank), total)

    def forward_stage(op: int) -> int:
        return ((op // per_round) % v) * p + rank

    def backward_stage(op: int) -> int:
        return (v - 1 - ((op - warmup) // per_round) % v) * p + rank

    order = [("F", forward_stage(op)) for op in range(warmup)]
    for op in range(warmup, total):
        order += [("F", forward_stage(op)), ("B", backward_stage(op))]
    order += [("B", backward_stage(op)) for op in range(total, total + warmup)]
    return order


@dataclass(frozen=True)
class StageCosts:
    """One stage's bytes per micro-batch (see the module docstring)."""

    inner: int
    received: int
    output: int  # the stage's output, if its last activation saves it (else 0; last stage: 0)
    mse_output: int  # o, on the last stage under MSE (else 0)
    fixed: int  # X or y, whole, on the first or last stage


def stage_costs(spec: MLPSpec, pipe: Schedule, batch_size: int) -> list[StageCosts]:
    """Costs of every stage of the cell's pipeline, in stage order."""
    s, b = spec.itemsize, batch_size
    micro = b // pipe.microbatches
    costs = chain_costs(spec, micro)
    ranges = stage_units(spec, pipe)
    out = []
    for index, (start, end) in enumerate(ranges):
        first, last = index == 0, index == len(ranges) - 1
        inner = sum(costs.boundary_bytes[start + 1:end]) + sum(costs.internal_bytes[start:end])
        output = costs.boundary_bytes[end] if not last and spec.activation != "gelu" else 0
        fixed = b * spec.input_dim * s if first else 0
        if last:
            label_row = label_row_bytes(spec)
            inner += loss_saved_bytes(spec, micro) - micro * label_row  # y's micro-batch is a view...
            fixed += b * label_row  # ...of the whole y, kept once
        out.append(StageCosts(inner=inner + output, received=0 if first else costs.boundary_bytes[start],
                              output=output, fixed=fixed,
                              mse_output=micro * spec.output_dim * s if last and spec.loss == "mse" else 0))
    return out


def pipeline_saved_bytes(spec: MLPSpec, pipe: Schedule, batch_size: int, rank: int) -> tuple[int, int]:
    """(what the schedule keeps at its peak, the textbook figure) of one rank's saved
    activations.

    Textbook: micro-batches in flight (forward done, backward not) times what each keeps,
    its received input included: GPipe m, 1F1B p - r on stage r.

    Kept, on top: every receive buffer (all m), and what the schedule holds after a backward.
    GPipe and 1F1B (``PipelineScheduleSingle``) wait for each send before the next, except
    that in 1F1B's steady state one output is still held by its send; both keep every
    micro-batch's output on the last stage. The interleaved schedule (a
    ``_PipelineScheduleRuntime``) waits for its sends only when the step ends, so every
    output a stage has sent stays alive until then: its peak is found by replaying the
    rank's order of forwards and backwards (``interleaved_order``).
    """
    m, p = pipe.microbatches, pipe.world_size
    stages = stage_costs(spec, pipe, batch_size)
    mine = ranks_stages(pipe, rank)
    fixed = sum(stages[k].fixed for k in mine)
    if pipe.schedule == "interleaved":
        return fixed + _replayed_peak(stages, rank, p, m, textbook=False), \
            fixed + _replayed_peak(stages, rank, p, m, textbook=True)
    (stage,) = (stages[k] for k in mine)
    in_flight = m if pipe.schedule == "gpipe" else min(m, p - rank)
    kept = in_flight * stage.inner + m * stage.received + (m - in_flight) * stage.mse_output
    if pipe.schedule == "1f1b" and m > p - rank:
        kept += stage.output  # one more output outlives its backward, held by its send
    return fixed + kept, fixed + in_flight * (stage.inner + stage.received)


def _replayed_peak(stages: list[StageCosts], rank: int, world_size: int, microbatches: int, textbook: bool) -> int:
    live = peak = 0
    for action, index in interleaved_order(rank, world_size, microbatches):
        stage = stages[index]
        if action == "F":
            live += stage.inner + stage.received
            peak = max(peak, live)
        elif textbook:
            live -= stage.inner + stage.received
        else:  # the receive buffer stays, and so does what the schedule still holds
            live -= stage.inner - stage.output - stage.mse_output
    return peak


def pipeline_comm_bytes(spec: MLPSpec, pipe: Schedule, batch_size: int, rank: int) -> int:
    """Bytes this rank sends and receives: each micro-batch's activation across each of
    its stage boundaries, forward, and its gradient back."""
    costs = chain_costs(spec, batch_size // pipe.microbatches)
    ranges = stage_units(spec, pipe)
    total = 0
    for index in ranks_stages(pipe, rank):
        start, end = ranges[index]
        total += (0 if index == len(ranges) - 1 else costs.boundary_bytes[end]) + (
            0 if index == 0 else costs.boundary_bytes[start])
    return pipe.microbatches * total


def stage_ranges(spec: MLPSpec, world_size: int) -> tuple[tuple[int, int], ...]:
    """[start, end) unit ranges of the N stages, split as the pipelines split."""
    return tuple(even_stages(spec, world_size))


def stage_of_label(label: str, ranges: tuple[tuple[int, int], ...]) -> int:
    """Which stage a SavedTensorProbe label belongs to: "4.Linear" is module 4, unit 2;
    the loss, s and anything outside a module run on the last device."""
    head = label.split(".", 1)[0]
    if not head.isdigit():
        return len(ranges) - 1
    unit = int(head) // 2
    return next(k for k, (start, end) in enumerate(ranges) if start <= unit < end)
