"""The figures bpmem reports, as one typed record, and every name derived from it.

``Figures`` is what ``bpmem estimate`` predicts, what ``bpmem measure`` measures, and what each
rank of a split strategy and each stage of ``model-parallel`` holds. Its field names are
results.csv's columns (with ``predicted_`` in front for a prediction), its aliases are the
short names of ``bpmem check`` rules (``saved:0%``), and the fields marked for the plugin are
the limits ``pytest --bpmem-compare-fail`` accepts. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# -- the records a breakdown and a timeline are made of (the ledger writes Events) --

@dataclass(frozen=True)
class Term:
    """One named part of a breakdown: its bytes, the formula that gave them, and why."""

    name: str
    bytes: int
    formula: str
    source: str


@dataclass(frozen=True)
class Event:
    """One step of a timeline: after ``op`` in ``phase``, ``live_bytes`` are alive."""

    op: str
    phase: str
    live_bytes: int


def _figure(alias: str, meaning: str, predicted: bool = True, plugin: bool = False) -> Any:
    return field(default=None, metadata={"alias": alias, "meaning": meaning, "predicted": predicted,
                                         "plugin": plugin})


@dataclass(frozen=True, kw_only=True)
class Figures:
    """Bytes of one step; None where a figure does not apply (a prediction has no CUDA peak)."""

    params_bytes: int | None = _figure("params", "parameters, each storage once")
    grads_bytes: int | None = _figure("grads", ".grad of every parameter after backward")
    optimizer_bytes: int | None = _figure("optimizer", "optimizer state (momentum, exp_avg, step, ...)")
    saved_activation_bytes: int | None = _figure(
        "saved", "activations retained for backward at the end of forward: every storage the forward made "
                 "that is still alive then, checkpoint frames included", plugin=True)
    peak_bytes: int | None = _figure("peak", "the most live bytes at once during one steady-state step",
                                     plugin=True)
    inference_peak_bytes: int | None = _figure("inference_peak",
                                               "the peak of one eval-mode forward under inference_mode")
    # its prediction, predicted_allocator_peak_bytes, is no estimate's field: it takes real steps
    # at small batches as well as the dry run (bpmem.predict.allocator)
    allocator_peak_bytes: int | None = _figure(
        "allocator_peak", "the allocator's own peak over the same step (train: the training step; inference: the "
                          "forward): on the CPU its trace in 64 B blocks over the resident storages as blocks, on "
                          "CUDA cuda_step_allocated_bytes", predicted=False)
    scratch_bytes: int | None = _figure(
        "scratch", "allocator_peak_bytes less the tensors' blocks live at that moment: what kernels allocate "
                   "inside themselves and free before they return, and wrapped scalars", predicted=False)
    saved_hook_bytes: int | None = _figure(
        "saved_hook", "what autograd's saved-tensor hooks see; equals saved but for checkpointing, whose "
                      "frames and kept outputs the hooks cannot see", predicted=False)
    cuda_max_allocated_bytes: int | None = _figure(
        "cuda_allocated", "torch.cuda.max_memory_allocated over the step (blocks rounded up to 512 B)",
        predicted=False, plugin=True)
    cuda_max_reserved_bytes: int | None = _figure(
        "cuda_reserved", "torch.cuda.max_memory_reserved over the step (what the caching allocator holds)",
        predicted=False)
    cuda_baseline_bytes: int | None = _figure(
        "cuda_baseline", "torch.cuda.memory_allocated as the step starts: its parameters, gradients, state and "
                         "batch, plus what the step never frees (the cuBLAS workspace, anything left over)",
        predicted=False)
    cuda_workspace_bytes: int | None = _figure(
        "cuda_workspace", "what the allocator held as the step started that is no tensor of the step: "
                          "cuda_baseline less the step's own resident storages in 512 B blocks (the cuBLAS "
                          "workspace, anything left over)", predicted=False)
    cuda_step_allocated_bytes: int | None = _figure(
        "cuda_step", "the step's own allocator peak: cuda_allocated less cuda_workspace; its prediction is "
                     "predicted_cuda_allocated_bytes", predicted=False)

    def to_dict(self, drop_none: bool = True) -> dict[str, Any]:
        """Every field (of a subclass too), without the ones that do not apply."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in out.items() if v is not None} if drop_none else out


FIGURE_FIELDS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(Figures)
FIGURE_NAMES: tuple[str, ...] = tuple(f.name for f in FIGURE_FIELDS)
# the figures that have a predicted_ twin in results.csv
PREDICTED_FIGURES: tuple[str, ...] = tuple(f.name for f in FIGURE_FIELDS if f.metadata["predicted"])
CUDA_FIGURES: tuple[str, ...] = tuple(name for name in FIGURE_NAMES if name.startswith("cuda_"))
ALIASES: dict[str, str] = {f.metadata["alias"]: f.name for f in FIGURE_FIELDS}
# the limits a pytest marker may set, the peak first: it is the one that decides whether a step fits
PLUGIN_LIMITS: dict[str, str] = dict(sorted(((f.metadata["alias"], f.name) for f in FIGURE_FIELDS
                                            if f.metadata["plugin"]), key=lambda pair: pair[0] != "peak"))
MEANINGS: dict[str, str] = {f.name: f.metadata["meaning"] for f in FIGURE_FIELDS}


@dataclass(frozen=True, kw_only=True)
class RankFigures(Figures):
    """One rank of a split strategy (or one stage of model-parallel): its own share."""

    textbook_saved_bytes: int | None = None  # the textbook count: micro-batches in flight only
    bubble_fraction: float | None = None  # of the step, this rank idles
    comm_bytes: int | None = None  # sent and received per step
    gathered_bytes: int | None = None  # FSDP: the largest unit's all-gathered parameters
    buffer_bytes: int | None = None  # DDP: gradient buckets, a second copy of every gradient


@dataclass(frozen=True, kw_only=True)
class MeasuredRank(Figures):
    """What one rank of a split strategy (or one stage of model-parallel) measured: the
    figures of its own share, and its step."""

    rank: int
    device: str
    peak_phase: str = ""
    peak_by_category: dict[str, int] = field(default_factory=dict)
    gathered_peak_bytes: int | None = None  # FSDP: the most its all-gathered parameters held at once
    step_time_median_s: float | None = None
    step_time_iqr_s: float | None = None
    time_noisy: bool | None = None  # its time's spread is large against its median (bpmem.measurement.timing)
    threads: int | None = None  # the intra-op threads it stepped with (torchrun ranks: 1 unless set)
    equivalence_max_rel_err: float | None = None  # its gradients against one device's


# what a sweep row takes from a measured rank
MEASURED_RANK_COLUMNS: tuple[str, ...] = (
    *(name for name in FIGURE_NAMES if not name.startswith("cuda_") and name != "inference_peak_bytes"),
    "peak_phase", "step_time_median_s", "step_time_iqr_s", "time_noisy", "threads",
    "equivalence_max_rel_err")


@dataclass(frozen=True, kw_only=True)
class StepFigures(Figures):
    """One step's figures and what the probes (or the replay) saw along the way."""

    per_layer: list[dict[str, Any]] = field(default_factory=list)  # saved bytes by module
    peak_phase: str = ""
    peak_by_category: dict[str, int] = field(default_factory=dict)
    timeline: list[Any] = field(default_factory=list)
    recompute_flops: int | None = 0  # matmul FLOPs recomputed in backward
    strategy_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Measured(StepFigures):
    """Measured figures of one cell (``bpmem measure``, a sweep row)."""

    loss: float | None = None  # J of the measured step, computed before the update
    rss_peak_bytes: int | None = None  # with --rss: the process's resident set, sampled
    caveats: list[str] = field(default_factory=list)  # where a fake-tensor run may differ from a real one
    # with trace=True: the training step's memory snapshot (bpmem.measurement.memory_trace), never in to_dict
    trace: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self, drop_none: bool = True) -> dict[str, Any]:
        out = super().to_dict(drop_none)
        out.pop("trace", None)
        return out


@dataclass(frozen=True, kw_only=True)
class Estimate(StepFigures):
    """Predicted figures for one (spec, step), plus how they arise: the terms of the
    breakdown, the replayed timelines and where the peak falls."""

    terms: list[Term] = field(default_factory=list)
    peak_op: str = ""
    inference_timeline: list[Event] = field(default_factory=list)
    peak_is_exact: bool = True
    peak_from_dry_run: bool = False  # the peak of the step on fake tensors (bpmem.predict.dry_run), not the replay's

    @property
    def training_to_inference_ratio(self) -> float:
        return self.peak_bytes / self.inference_peak_bytes

    def under_strategy(self, retained: int, peak: int, recompute_flops: int | None, params: dict[str, Any],
                       terms: list[Term]) -> Estimate:
        """This plain step's estimate changed by a strategy: what it retains, its estimated
        (not replayed) peak and recomputation; parameters, gradients, optimizer state and
        the inference peak are the plain step's."""
        return dataclasses.replace(
            self, saved_activation_bytes=retained, peak_bytes=peak, per_layer=[], terms=self.terms + terms,
            peak_phase="backward", peak_op="", peak_by_category={}, timeline=[], recompute_flops=recompute_flops,
            strategy_params=params, peak_is_exact=False)

    def to_dict(self, drop_none: bool = True) -> dict[str, Any]:
        out = {k: v for k, v in super().to_dict(drop_none).items() if k not in ("timeline", "inference_timeline")}
        out["terms"] = [dataclasses.asdict(t) for t in self.terms]
        out["training_to_inference_ratio"] = self.training_to_inference_ratio
        return out
