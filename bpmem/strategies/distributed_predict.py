"""What each rank of a split strategy holds, predicted without running it: the checks a
cell must pass, and per-rank parameters, gradients, optimizer state, retained activations,
bubble and traffic (DDP, FSDP2, tensor parallelism and the pipelines)."""

from __future__ import annotations

from typing import Any

from bpmem.spec import MLPSpec, StepSpec
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
