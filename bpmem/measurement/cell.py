"""One cell of bpmem's MLP (``bpmem measure``, a sweep row): real steps, every figure off the probes.

Order of work, each on a fresh step of the same model so that probes never watch each other:
1. a warm-up step, so the optimizer state exists (the steady state that peak_bytes is defined on);
2. a step under ``SavedTensorProbe``: saved activation bytes, per layer;
3. a step under ``LiveTensorProbe``: the training peak and its timeline;
4. a forward under ``inference_mode`` and ``LiveTensorProbe``: the inference peak;
5. on CUDA, a step under ``CudaProbe``; with ``rss=True``, a step under ``RssProbe``.
"""

from __future__ import annotations

import contextlib
import gc
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bpmem.figures import Measured
from bpmem.measurement.allocator_step import cpu_allocator_figures, resident_tensors
from bpmem.measurement.fake_kernels import DeviceStorageSizes
from bpmem.measurement.fast_paths import NESTED_CAVEAT, dense_encoders
from bpmem.measurement.memory_trace import snapshot_from_allocations
from bpmem.measurement.precision import Precision, precision_for, settle
from bpmem.measurement.step import hvp_step, inference_step, make_optimizer, train_step
from bpmem.measurement.timing import plain_columns, time_samples
from bpmem.measurement.timing_pairs import MAX_TIMED_SECONDS, Paired, paired_columns, time_pairs
from bpmem.models.batch import input_tensors
from bpmem.models.mlp import as_workload, meta_batch
from bpmem.models.workload import Workload
from bpmem.probes import (
    CudaProbe,
    LiveTensorProbe,
    RssProbe,
    SavedTensorProbe,
    allocator_block_bytes,
    distinct_storage_bytes,
)
from bpmem.spec import MLPSpec, NoStrategy, StepSpec, StrategyRuntime
from bpmem.torch_private import cuda_history, data_dependent_errors, fake_mode_active, fake_tensor_mode


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA or CPU allocation that failed (the CPU allocator raises a RuntimeError that
    says "can't allocate memory"; Python's MemoryError counts too)."""
    oom_types = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError,
                       MemoryError})
    return isinstance(error, oom_types) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error)))


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor in the optimizer's per-parameter state (momentum, exp_avg, step, ...)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "params_bytes": distinct_storage_bytes(params),
        "grads_bytes": distinct_storage_bytes(p.grad for p in params),
        "optimizer_bytes": distinct_storage_bytes(optimizer_state_tensors(optimizer)),
    }


def measure_inference_peak(model: nn.Module, x: torch.Tensor, workload: Workload | None = None,
                           precision: Precision | None = None) -> LiveTensorProbe:
    """Peak of one inference forward; live at the start are the parameters and the batch.

    No graph hooks: an inference forward builds no graph, and their function mode would make
    PyTorch's eval fast paths (``bpmem.measurement.fast_paths``) see a ``__torch_function__``
    and step aside, so the probe would watch another forward than the one people run."""
    probe = LiveTensorProbe({"params": model.parameters(), "buffers": model.buffers(), "inputs": _tensors(x)},
                            hook_graphs=False)
    with probe:
        inference_step(model, x, probe.phase, workload, precision)
    return probe


def _tensors(*batch: Any) -> list[torch.Tensor]:
    """The tensors of a batch: inputs may be a tuple or a dict, the target may be None."""
    return [t for item in batch for t in input_tensors(item)]


def measure_training_peak(spec: MLPSpec, model: nn.Module, optimizer: torch.optim.Optimizer,
                          x: torch.Tensor, y: torch.Tensor, strategy: StrategyRuntime | None = None,
                          log_allocations: bool = False) -> LiveTensorProbe:
    """Peak of one steady-state training step, starting from what the previous step left
    (with ``log_allocations``, the probe's ledger keeps every allocation and free in order)."""
    params = list(model.parameters())
    probe = LiveTensorProbe({
        "params": params,
        "buffers": list(model.buffers()),
        "grads": [p.grad for p in params],
        "optimizer": optimizer_state_tensors(optimizer),
        "inputs": _tensors(x, y),
    })
    probe.ledger.allocations = [] if log_allocations else None
    with probe:
        train_step(spec, model, optimizer, x, y, phase=probe.phase, strategy=strategy)
    return probe


def step_flops(spec: MLPSpec, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, strategy: StrategyRuntime | None = None) -> int:
    """Matmul FLOPs of one training step, as ``torch.utils.flop_counter.FlopCounterMode`` counts
    them (2*M*N*K per mm/addmm; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step(spec, model, optimizer, x, y, strategy=strategy)
    return int(counter.get_total_flops())


def plain_step_flops(spec: MLPSpec | Workload, batch_size: int, device: str = "cpu") -> int:
    """Matmul FLOPs of the plain step's forward and backward (the optimizer does no matmul),
    counted on fake tensors of ``device``: shapes only, no memory, so a strategy's cell never
    has to fit the plain step it is compared with, and the kernels are the device's own
    (attention counts differently on each backend)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bpmem.measurement.step import forward_objective

    workload = as_workload(spec)
    with fake_tensor_mode():
        model = workload.build(device, seed=None)
        x, y = meta_batch(workload, batch_size, device)
        with FlopCounterMode(display=False) as counter:
            forward_objective(workload, model, x, y).backward()
    return int(counter.get_total_flops())


def measure(spec: MLPSpec | Workload, step: StepSpec, device: str = "cpu", seed: int = 0, rss: bool = False,
            fake: bool = False, trace: bool = False) -> Measured:
    """Measure one configuration: the figures that apply, per_layer and the timeline; with
    ``trace``, a training step's memory snapshot too (``bpmem.measurement.memory_trace``: the live probe's
    allocations on the CPU, the caching allocator's history on CUDA).

    With ``fake``, every tensor is a fake one (``bpmem.torch_private.fake_tensor_mode``): the
    same steps under the same probes, with no data and no memory, as ``bpmem estimate
    --model`` runs them. A model whose forward depends on its data cannot run so: that is a
    ``DataDependentModel`` error."""
    if step.amp != "none" and isinstance(spec, MLPSpec) and spec.dtype != "float32":
        raise ValueError(f"dtype: {spec.dtype} parameters under --amp {step.amp}; autocast keeps float32 parameters "
                         "and casts them itself; allowed: float32 with --amp")
    if not fake:
        return Measured(**_measure_fields(spec, step, device, seed, rss, trace))
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # PyTorch warns once per process; every estimate must hear it
    try:
        with warnings.catch_warnings(record=True) as caught, fake_tensor_mode(), DeviceStorageSizes():
            warnings.simplefilter("always")
            fields = _measure_fields(spec, step, device, seed, rss=False)
        pointers = any("data pointer of FakeTensor" in str(w.message) for w in caught)
        caveats = ([POINTER_CAVEAT] if pointers else []) + fields.pop("caveats", [])
        return Measured(**fields, caveats=caveats)
    except data_dependent_errors() as error:
        raise DataDependentModel(str(error).strip().splitlines()[0] if str(error).strip() else "") from None
    finally:
        torch.set_warn_always(warn_always)


# a kernel chosen after reading data pointers (attention's alignment checks) may differ on fake tensors
POINTER_CAVEAT = ("the model's step read data pointers, which fake tensors do not have: a kernel chosen that way "
                  "may differ from a real run's; check with bpmem measure --model")


# what torch.utils.checkpoint raises when an in-place op overwrites a tensor it keeps
IN_PLACE_CLASH = re.compile(r"modified by an inplace operation|cached during selective activation checkpoint "
                            r"has been mutated")


class DataDependentModel(ValueError):
    """The model's forward depends on its data (``nonzero``, ``.item()``, a branch on a value),
    which tensors without data cannot follow."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"model: its forward depends on the data ({detail[:160]}), which an estimate without "
                         "data cannot follow; allowed: bpmem measure --model ..., which runs it for real")


def _traces_allocator(device: str) -> bool:
    """The CPU allocator's trace is taken of real CPU steps (fake tensors allocate nothing)."""
    return torch.device(device).type == "cpu" and not fake_mode_active()


@contextlib.contextmanager
def _no_phase(name: str) -> Any:
    yield


def _measure_fields(spec: MLPSpec | Workload, step: StepSpec, device: str, seed: int, rss: bool,
                    trace: bool = False) -> dict[str, Any]:
    workload = as_workload(spec)
    model = workload.build(device, seed=seed)
    x, y = workload.make_batch(step.batch_size, device, seed=seed)
    result: dict[str, Any] = {}
    with dense_encoders(model) as nested:  # a dry run cannot pack nested tensors: it runs them dense, and says so
        inference = measure_inference_peak(model, x, workload, precision_for(step.amp, device))
    if nested.ran_dense:
        result["caveats"] = [NESTED_CAVEAT]
    result["inference_peak_bytes"] = inference.peak_bytes
    if step.mode == "inference":
        if _traces_allocator(device):
            result.update(cpu_allocator_figures(
                lambda phase: inference_step(model, x, phase or _no_phase, workload, precision_for(step.amp, device)),
                lambda: resident_tensors(model, None, _tensors(x)), hook_graphs=False))
        result.update(params_bytes=distinct_storage_bytes(model.parameters()), grads_bytes=0,
                      optimizer_bytes=0, saved_activation_bytes=0, peak_bytes=inference.peak_bytes,
                      per_layer=[], timeline=inference.timeline, peak_phase="forward", recompute_flops=None,
                      peak_by_category=inference.peak_by_category)
        return result

    if step.mode == "hvp":
        return _measure_hvp(workload, model, x, y, result)
    plain = isinstance(step.strategy, NoStrategy)
    strategy = step.strategy.runtime(spec, step)
    optimizer = make_optimizer(step, model)
    try:
        # warm-up: optimizer state exists (float16: once its scaler no longer skips the step)
        settle(lambda: train_step(workload, model, optimizer, x, y, strategy=strategy), optimizer)
    except RuntimeError as error:
        if plain or not IN_PLACE_CLASH.search(str(error)):
            raise
        raise ValueError(f"strategy: {step.strategy.name} cannot run this model: an in-place op (such as "
                         "ReLU(inplace=True)) overwrites a tensor a checkpoint keeps; allowed: the model without "
                         "in-place ops, or microbatch") from None
    saved = SavedTensorProbe(model)
    objective_bytes: list[int] = []  # J's, each micro-batch's with gradient accumulation
    with saved:
        result["loss"] = train_step(workload, model, optimizer, x, y, scope=saved.scope, strategy=strategy,
                                    observe=lambda j: objective_bytes.append(j.untyped_storage().nbytes()))
    result.update(_state_bytes(model, optimizer))
    result["saved_hook_bytes"] = saved.saved_activation_bytes
    result["per_layer"] = saved.per_layer()
    result["strategy_params"] = strategy.params() if strategy is not None else {}
    plain_flops = 0 if plain else plain_step_flops(spec, step.batch_size, device)
    cuda = torch.device(device).type == "cuda"
    live = settle(lambda: measure_training_peak(spec, model, optimizer, x, y, strategy,
                                                log_allocations=trace and not cuda), optimizer)
    if step.strategy.compiles:
        # what the compiled function saves through ctx.save_for_backward, which the hooks see;
        # its FLOPs counted in its own graphs (under an outer FlopCounterMode dynamo runs eagerly)
        result["saved_activation_bytes"] = saved.saved_activation_bytes
        with strategy.tally.counting() as tally:  # type: ignore[attr-defined]
            train_step(spec, model, optimizer, x, y, strategy=strategy)
        result["recompute_flops"] = tally.total - plain_flops
    else:
        # Retained activations, truly: every storage the forward made that is still alive when
        # it ends, but J itself (one element), plus the inputs the graph holds on to. This sees
        # what checkpointing keeps in its own frames, which saved-tensor hooks cannot.
        made_in_forward = max(ends.get("forward", 0) for name, ends in live.phase_ends if name == "forward")
        made_in_forward -= objective_bytes[-1]  # J's storage (each micro-batch's with accumulation; MSE's spans B*q)
        result["saved_activation_bytes"] = made_in_forward + saved.packed_bytes_of(_tensors(x, y))
        result["recompute_flops"] = 0 if plain else step_flops(spec, model, optimizer, x, y, strategy) - plain_flops
    result["peak_bytes"] = live.peak_bytes
    result["peak_phase"] = live.peak_phase
    result["peak_by_category"] = live.peak_by_category
    result["timeline"] = live.timeline
    if trace and not cuda:
        result["trace"] = snapshot_from_allocations(live.ledger.allocations or [])
    if _traces_allocator(device) and not step.strategy.compiles:  # a dispatch mode would make dynamo run eagerly
        result.update(cpu_allocator_figures(
            lambda phase: train_step(spec, model, optimizer, x, y, phase=phase or _no_phase, strategy=strategy),
            lambda: resident_tensors(model, optimizer, _tensors(x, y))))
    if cuda:
        snapshot: dict[str, Any] = {}
        # what the step's own tensors hold of the allocator as it starts (the last step's
        # gradients included); the rest of the baseline is no tensor of the step
        resident = allocator_block_bytes([*model.parameters(), *(p.grad for p in model.parameters()),
                                          *optimizer_state_tensors(optimizer), *_tensors(x, y)])

        def cuda_step() -> CudaProbe:
            with CudaProbe(device) as probe, cuda_history(device, snapshot) if trace else contextlib.nullcontext():
                train_step(spec, model, optimizer, x, y, strategy=strategy)
            return probe

        allocator = settle(cuda_step, optimizer)
        result.update(allocator.result())
        result["cuda_workspace_bytes"] = allocator.start_allocated_bytes - resident
        result["cuda_step_allocated_bytes"] = allocator.cuda_max_allocated_bytes - result["cuda_workspace_bytes"]
        result["allocator_peak_bytes"] = result["cuda_step_allocated_bytes"]
        result["scratch_bytes"] = max(0, result["allocator_peak_bytes"] - result["peak_bytes"])
        if trace:
            result["trace"] = snapshot
    if rss:
        with RssProbe() as rss_probe:
            train_step(spec, model, optimizer, x, y, strategy=strategy)
        result.update(rss_probe.result())
    return result


def _measure_hvp(spec: MLPSpec | Workload, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 result: dict[str, Any]) -> dict[str, Any]:
    """Saved bytes over the forward and the create_graph backward; the peak of the whole H v."""
    params = [p for p in model.parameters() if p.requires_grad]  # H v over what trains: frozen layers have no H
    vector = [torch.randn_like(p) for p in params]
    try:
        hvp_step(spec, model, x, y, vector)  # warm-up
    except RuntimeError as error:
        missing = re.search(r"derivative for (\S+) is not implemented", str(error))
        if missing is None:
            raise
        raise ValueError(f"mode: hvp differentiates the backward, and {missing.group(1)} has no double backward "
                         "(CPU attention's flash kernel has none, for one); allowed: train, inference") from None
    saved = SavedTensorProbe(model)
    with saved:
        hvp_step(spec, model, x, y, vector, scope=saved.scope)
    live = LiveTensorProbe({"params": list(model.parameters()), "inputs": [*_tensors(x, y), *vector]})
    with live:
        hvp_step(spec, model, x, y, vector, phase=live.phase)
    result.update(params_bytes=distinct_storage_bytes(model.parameters()), grads_bytes=distinct_storage_bytes(params),
                  optimizer_bytes=0,
                  saved_activation_bytes=saved.saved_activation_bytes, saved_hook_bytes=saved.saved_activation_bytes,
                  per_layer=saved.per_layer(), peak_bytes=live.peak_bytes, peak_phase=live.peak_phase,
                  peak_by_category=live.peak_by_category, timeline=live.timeline, recompute_flops=0,
                  strategy_params={})
    return result


def _step_runner(spec: MLPSpec | Workload, step: StepSpec, device: str, seed: int) -> Callable[[], None]:
    """One step of ``step``'s mode on a fresh model, batch (and optimizer), no probe."""
    workload = as_workload(spec)
    model = workload.build(device, seed=seed)
    x, y = workload.make_batch(step.batch_size, device, seed=seed)
    if step.mode == "inference":
        def run() -> None:
            inference_step(model, x, workload=workload, precision=precision_for(step.amp, device))
    elif step.mode == "hvp":
        vector = [torch.randn_like(p) for p in model.parameters()]

        def run() -> None:
            hvp_step(spec, model, x, y, vector)
    else:
        optimizer = make_optimizer(step, model)
        strategy = step.strategy.runtime(spec, step)

        def run() -> None:
            train_step(spec, model, optimizer, x, y, strategy=strategy)
    return run


def time_steps(spec: MLPSpec | Workload, step: StepSpec, device: str, warmup: int, repeats: int,
               seed: int = 0, max_seconds: float = MAX_TIMED_SECONDS) -> dict[str, Any]:
    """A row's time columns (``bpmem.measurement.timing``), from steps without probes on fresh models.

    The plain step is timed alone: warm-up, then ``repeats`` steps. A strategy's step is timed
    in pairs with the plain step of the same model, batch, optimizer and mode, each on its own
    model, in this process (``bpmem.measurement.timing_pairs.time_pairs``); where the plain step does not
    fit beside it (out of memory: a strategy may be there to fit where the plain step does
    not), the strategy's step is timed alone and the row has no paired overhead. Pairs go on
    past ``repeats`` for at most ``max_seconds`` of timed steps (the sweep's ``timing_cap_s``). The CPU-time
    rule for contention applies to CPU steps only. On CUDA each timed step is bracketed by
    ``torch.cuda.synchronize`` so the clock sees the kernels, not just their launch.
    """
    judge_cpu = torch.device(device).type == "cpu"  # a CUDA step's CPU waits on the GPU: no rule
    run = _step_runner(spec, step, device, seed)
    if not isinstance(step.strategy, NoStrategy):
        paired = _time_paired(spec, step, device, warmup, repeats, seed, run, max_seconds)
        if paired is not None:
            return paired_columns(paired, judge_cpu)
        gc.collect()  # the plain twin's model and optimizer state, before the strategy is timed alone
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return plain_columns(time_samples(run, warmup, repeats, [device]), judge_cpu)


def _time_paired(spec: MLPSpec | Workload, step: StepSpec, device: str, warmup: int, repeats: int, seed: int,
                 run: Callable[[], None], max_seconds: float) -> Paired | None:
    """``time_pairs`` of the plain twin and ``run``; None when that runs out of memory."""
    try:
        plain = _step_runner(spec, step.replace(strategy=NoStrategy()), device, seed)
        return time_pairs(plain, run, warmup, repeats, [device], max_seconds=max_seconds)
    except Exception as error:  # noqa: BLE001 - out of memory falls back to timing alone; the rest is raised
        if not is_out_of_memory(error):
            raise
    return None
