"""The exact peak where the arithmetic has only an upper estimate, by a dry run.

The arithmetic replays the plain step's peak exactly (``bpmem.analytic.plain_step``), and
each strategy's retained bytes exactly, but the peak of a checkpointed, selective or hvp
step is an estimate: the plain peak, less what is no longer retained, plus the largest
recompute working set, assuming the peak falls where the plain step's does. Where
``Estimate.peak_is_exact`` is false, ``estimate_exactly`` runs the step once on fake
tensors (``bpmem.measurement.cell.measure(fake=True)``: the same step under the same probes,
with no data and no memory, as the estimate of your own model does) and takes its peak.
The arithmetic figure stays in the terms, so both can be read side by side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bpmem.figures import Estimate, Term
from bpmem.predict.estimate import estimate
from bpmem.spec import MLPSpec, StepSpec


def dry_run_device(device: str, step: StepSpec | None = None) -> str:
    """Where a dry run for a cell on ``device`` runs its fake tensors: on that device where it
    exists here (fake CUDA tensors take CUDA's own kernels, autocast policy and RNG outputs),
    else on the CPU. A CUDA cell is only ever measured where CUDA is, so its row's dry run
    is always CUDA's; without CUDA, autograd cannot even make a fake CUDA tensor's node.
    A ``step`` that compiles (compile-budget) runs on the CPU's: a compile on fake CUDA
    tensors is untried, and a GPU's minutes are for measuring."""
    if not device.startswith("cuda") or (step is not None and step.strategy.compiles):
        return "cpu"
    import torch

    return device if torch.cuda.is_available() else "cpu"


def predicted_cuda_allocated(spec: MLPSpec | Any, step: StepSpec, device: str = "cuda") -> int:
    """The training peak (inference: the forward's) with every CUDA storage counted as the
    caching allocator's block, rounded up to 512 B, from a dry run on ``device``: what
    ``max_memory_allocated`` should read over the step, beside the baseline it also holds
    (``cuda_workspace_bytes``: the cuBLAS workspace, anything left from before). Storages
    on the CPU (Adam's step counters) are not the allocator's and do not count. Without
    CUDA here, the kernels and placement are the CPU's."""
    from bpmem.measurement.cell import measure
    from bpmem.probes.live import CUDA_BLOCK_BYTES, allocator_blocks

    where = dry_run_device(device)
    with allocator_blocks(CUDA_BLOCK_BYTES, "cuda" if where != "cpu" else None):
        dry = measure(spec, step, device=where, fake=True)
    return dry.inference_peak_bytes if step.mode == "inference" else dry.peak_bytes


def estimate_exactly(spec: MLPSpec, step: StepSpec, device: str = "cpu") -> Estimate:
    """``estimate``, with the peak of a dry run where the arithmetic's is an upper estimate
    (``peak_is_exact`` then says which one it is). For a CUDA cell's hvp the dry run is on
    CUDA (``dry_run_device``) and gives the retained bytes too: CUDA's double backward keeps
    other tensors than the CPU's, which the arithmetic follows."""
    est = estimate(spec, step)
    if est.peak_is_exact:
        return est  # the replay's exact peak: torch is never imported
    from bpmem.measurement.cell import measure

    where = dry_run_device(device, step)
    dry = measure(spec, step, device=where, fake=True)
    arithmetic = Term("peak: the arithmetic's estimate", est.peak_bytes, "plain peak - no longer retained + "
                      "largest recompute working set", "an upper estimate; the peak above is the dry run's")
    saved = dry.saved_activation_bytes if where != "cpu" and step.mode == "hvp" else est.saved_activation_bytes
    return dataclasses.replace(est, peak_bytes=dry.peak_bytes, peak_phase=dry.peak_phase,
                               peak_by_category=dry.peak_by_category, terms=[*est.terms, arithmetic],
                               saved_activation_bytes=saved, peak_op="", peak_is_exact=True,
                               peak_from_dry_run=True)
