"""``bpmem fit``: the largest batch size whose predicted training peak fits a memory budget.

The search asks the estimate, never the allocator: it draws the line through the peaks at
B = 1 and 2, probes where that line crosses the budget and one batch on (``largest_batch``),
so a budget of 80 GiB costs a handful of estimates and no memory. Each strategy's model is
warmed up on fake tensors once and probed at every batch (``WarmFakeStep``). For the MLP the
estimate is the analytic replay; for a ``--model`` it is the step run on fake tensors. The
peak is assumed to grow with the batch, which holds for every model whose activations do.

On the CPU, where ``bpmem.predict.allocator`` applies (one device's train step, not compiled),
the search holds the **allocator's** predicted peak to the budget: the dry run's tensors as
64 B blocks plus each op's kernel scratch, calibrated from real steps at small batches (whose
measured error at a third batch is reported with the answer). The calibration runs real
steps, so it is skipped, and the tensors' peak searched instead, where its check step would
need more than half the memory available (``bpmem.predict.calibrated``), or where the model takes a
path the dry run cannot follow; ``Fit.figure`` says which figure was searched.

``--device-kind cuda`` searches the CUDA caching allocator's predicted **reserved** peak (what
runs out: an OOM is a ``cudaMalloc`` that fails), from the dry run's allocations through the
model of the allocator, plus an allowance for the CUDA context (``CUDA_CONTEXT_BYTES``). The
peaks beside it count every storage as the CUDA caching allocator's block, its size
rounded up to 512 B (what ``torch.cuda.max_memory_allocated`` counts). It cannot see cuDNN's
workspaces or NCCL buffers: leave room for them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bpmem.predict.cuda_profile import TORCH_2_11_CUDA_13
from bpmem.spec import ONE_DEVICE, MLPSpec, StepSpec

LARGEST_BATCH = 2**40  # the search stops here: a model whose peak never reaches the budget


@dataclass(frozen=True)
class Fit:
    """One strategy's answer: the largest batch that fits, its peaks, and the next batch's."""

    strategy: str
    max_batch_size: int | None  # None: not even one row fits
    peak_bytes: int | None  # the tensors' peak at max_batch_size
    next_peak_bytes: int | None  # at max_batch_size + 1 (or at 1 when nothing fits)
    error: str = ""  # the strategy cannot apply to this model: why
    figure: str = "peak_bytes"  # the figure the search held to the budget: peak_bytes or allocator_peak_bytes
    allocator_peak_bytes: int | None = None  # the CPU allocator's predicted peak at max_batch_size
    next_allocator_peak_bytes: int | None = None  # ... and at the next batch
    calibrated_ops: tuple[str, ...] = ()  # the ops whose scratch the calibration measured
    calibration_error: float | None = None  # its (predicted - measured) / measured at its check batch
    not_calibrated: str = ""  # on the CPU, why the allocator's figure was not searched
    cuda_reserved_bytes: int | None = None  # device_kind cuda: the caching allocator's predicted reserved peak
    next_cuda_reserved_bytes: int | None = None  # ... at the next batch (neither includes the context allowance)


# non-PyTorch memory of a CUDA process (the context, the libraries' handles), as measured for the
# profile (bpmem.predict.cuda_profile: an H200's out-of-memory message)
CUDA_CONTEXT_BYTES = TORCH_2_11_CUDA_13.context_bytes


SECANT_PROBES = 8  # guesses from the line before the search falls back to halving the bracket


def largest_batch(peak_of: Callable[[int], int], memory: int,
                  known: dict[int, int] | None = None) -> tuple[int | None, int | None, int]:
    """(largest b with peak_of(b) <= memory, its peak, the peak at b + 1).

    A training peak is affine in the batch between the allocator's rounding steps (every
    activation is rows times a per-row size), so the line through two probes predicts where
    the budget is crossed; probing there and one batch on verifies it. An affine peak costs
    four probes (1, 2, the guess, the guess + 1) where doubling and halving cost about
    2 log2(B). Where the guess misses (rounding, a strategy whose peak moves), the next guess
    comes from the two probes nearest the crossing, and after ``SECANT_PROBES`` guesses the
    bracket is halved instead, so the search always ends. Only probes decide the answer: the
    reported batch fits and the next does not, by ``peak_of`` itself. ``known`` holds peaks
    already probed (batch -> peak), which the first guess uses."""
    seen: dict[int, int] = dict(known or {})

    def probe(batch: int) -> int:
        if batch not in seen:
            seen[batch] = peak_of(batch)
        return seen[batch]

    if probe(1) > memory:
        return None, None, seen[1]
    low, high = 1, None  # peak(low) fits; peak(high) does not (None: not found yet)
    for batch, peak in seen.items():
        if peak <= memory:
            low = max(low, batch)
        else:
            high = batch if high is None else min(high, batch)
    guesses = 0
    guess = 2 if len(seen) < 2 else _next_guess(seen, low, high, memory, False)
    while high is None or high - low > 1:
        if probe(guess) <= memory:
            low = max(low, guess)
        else:
            high = guess if high is None else min(high, guess)
        if high is not None and high - low <= 1:
            break
        if low >= LARGEST_BATCH:
            break
        guesses += 1
        guess = _next_guess(seen, low, high, memory, guesses > SECANT_PROBES)
    return low, seen[low], probe(low + 1)


def _next_guess(seen: dict[int, int], low: int, high: int | None, memory: int, halve: bool) -> int:
    """The batch where the line through the probes nearest the crossing meets ``memory``,
    kept strictly inside the bracket (halving it where ``halve``)."""
    if high is not None and halve:
        return (low + high) // 2
    below = max((b for b in seen if b < low), default=None)
    other = high if high is not None else below
    slope = (seen[other] - seen[low]) / (other - low) if other is not None else 0.0
    guess = low + int((memory - seen[low]) // slope) if slope > 0 else low * 2
    if high is None:
        return min(max(guess, low + 1), LARGEST_BATCH)
    return min(max(guess, low + 1), high - 1)


def predicted_peak(model: MLPSpec | Any, step: StepSpec, device_kind: str = "cpu") -> int:
    """The estimate's training peak for one step: analytic for the MLP on the CPU, else the
    step on fake tensors (with the CUDA allocator's blocks for ``device_kind="cuda"``)."""
    if isinstance(model, MLPSpec) and device_kind == "cpu" and step.amp == "none":  # autocast: no arithmetic
        from bpmem.predict.dry_run import estimate_exactly

        return estimate_exactly(model, step).peak_bytes
    from bpmem.measurement.cell import DataDependentModel, measure_training_peak
    from bpmem.measurement.step import make_optimizer, train_step
    from bpmem.models.mlp import as_workload
    from bpmem.probes.live import CUDA_BLOCK_BYTES, allocator_blocks
    from bpmem.torch_private import data_dependent_errors, fake_tensor_mode

    workload = as_workload(model)
    strategy = step.strategy.runtime(model, step)
    try:  # measure()'s training peak alone: a warm-up step, then the steady-state step under the probe
        with fake_tensor_mode(), allocator_blocks(CUDA_BLOCK_BYTES if device_kind == "cuda" else 1):
            module = workload.build("cpu", seed=0)
            x, y = workload.make_batch(step.batch_size, "cpu")
            optimizer = make_optimizer(step, module)
            train_step(workload, module, optimizer, x, y, strategy=strategy)
            return measure_training_peak(workload, module, optimizer, x, y, strategy).peak_bytes
    except data_dependent_errors() as error:
        raise DataDependentModel(str(error).strip().splitlines()[0] if str(error).strip() else "") from None


class WarmFakeStep:
    """One strategy's model and optimizer on fake tensors, warmed up once (at one row); then
    each batch's steady-state training peak, one fake step each. The model, its gradients and
    the optimizer's state are the same whatever the batch, so a steady step at B that follows a
    step at another batch starts from what a step at B leaves: its peak is ``predicted_peak``'s,
    at half the cost. Not for a strategy that plans from the first batch's measured costs
    (checkpoint-budget): its plan depends on B."""

    def __init__(self, model: MLPSpec | Any, step: StepSpec, device_kind: str) -> None:
        from bpmem.measurement.step import make_optimizer, train_step
        from bpmem.models.mlp import as_workload
        from bpmem.torch_private import fake_tensor_mode

        self.workload, self.device_kind = as_workload(model), device_kind
        self.strategy = step.strategy.runtime(model, step)
        self.mode = fake_tensor_mode()
        with self._fake():
            self.module = self.workload.build("cpu", seed=0)
            self.optimizer = make_optimizer(step, self.module)
            x, y = self.workload.make_batch(1, "cpu")
            train_step(self.workload, self.module, self.optimizer, x, y, strategy=self.strategy)

    def _fake(self) -> Any:
        import contextlib

        from bpmem.measurement.cell import DataDependentModel
        from bpmem.probes.live import CUDA_BLOCK_BYTES, allocator_blocks
        from bpmem.torch_private import data_dependent_errors

        @contextlib.contextmanager
        def entered() -> Any:
            try:
                with self.mode, allocator_blocks(CUDA_BLOCK_BYTES if self.device_kind == "cuda" else 1):
                    yield
            except data_dependent_errors() as error:
                raise DataDependentModel(str(error).strip().splitlines()[0] if str(error).strip() else "") from None
        return entered()

    def peak(self, batch: int) -> int:
        from bpmem.measurement.cell import measure_training_peak

        with self._fake():
            x, y = self.workload.make_batch(batch, "cpu")
            return measure_training_peak(self.workload, self.module, self.optimizer, x, y, self.strategy).peak_bytes


class TensorPeaks:
    """batch -> the predicted training peak, each batch's computed once (``known``): one warm
    fake step per strategy where that is exact (``WarmFakeStep``), else ``predicted_peak``
    afresh at each batch."""

    def __init__(self, model: MLPSpec | Any, step: StepSpec, device_kind: str) -> None:
        self.model, self.step, self.device_kind = model, step, device_kind
        analytic = isinstance(model, MLPSpec) and device_kind == "cpu" and step.amp == "none"
        self.warm = None if analytic or getattr(step.strategy, "plans_from_costs", False) else \
            WarmFakeStep(model, step, device_kind)
        self.known: dict[int, int] = {}

    def __call__(self, batch: int) -> int:
        if batch not in self.known:
            self.known[batch] = self.warm.peak(batch) if self.warm is not None else \
                predicted_peak(self.model, dataclasses.replace(self.step, batch_size=batch), self.device_kind)
        return self.known[batch]


def _search(model: MLPSpec | Any, step: StepSpec, memory: int, device_kind: str) -> Fit:
    """One strategy's search: the allocator's predicted peak where it is calibrated, else the tensors'."""
    from bpmem.predict.allocator import predict_allocator_peak
    from bpmem.predict.calibrated import guarded_calibration

    peak_of = TensorPeaks(model, step, device_kind)

    calibration, why_not = guarded_calibration(model, step, peak_of) if device_kind == "cpu" else (None, "")
    if calibration is not None:
        @functools.cache
        def allocator_of(batch: int) -> int:
            at = dataclasses.replace(step, batch_size=batch)
            return predict_allocator_peak(model, at, calibration).allocator_peak_bytes

        try:
            found, allocator, next_allocator = largest_batch(allocator_of, memory)
        except ValueError as error:  # the dry run cannot follow a path the real step takes
            calibration, why_not = None, str(error).splitlines()[0]
    if calibration is None:
        found, peak, next_peak = largest_batch(peak_of, memory, peak_of.known)
        return Fit(step.strategy.name, found, peak, next_peak, not_calibrated=why_not)
    peak, next_peak = (peak_of(found), peak_of(found + 1)) if found else (None, peak_of(1))
    return Fit(step.strategy.name, found, peak, next_peak, figure="allocator_peak_bytes",
               allocator_peak_bytes=allocator, next_allocator_peak_bytes=next_allocator,
               calibrated_ops=calibration.calibrated_ops, calibration_error=calibration.check_error)


def _search_cuda(model: MLPSpec | Any, step: StepSpec, memory: int, context: int) -> Fit:
    """One strategy's search on CUDA: the caching allocator's predicted reserved peak (the
    dry run's allocations through ``bpmem.cuda_allocator``) plus the context allowance."""
    from bpmem.predict.cuda_reserved import predict_cuda_allocator

    @functools.cache
    def held_at(batch: int) -> int:
        at = dataclasses.replace(step, batch_size=batch)
        return predict_cuda_allocator(model, at, "cuda").reserved_bytes + context

    blocks_at = TensorPeaks(model, step, "cuda")

    found, held, next_held = largest_batch(held_at, memory)
    peak, next_peak = (blocks_at(found), blocks_at(found + 1)) if found else (None, blocks_at(1))
    return Fit(step.strategy.name, found, peak, next_peak, figure="cuda_reserved_bytes",
               cuda_reserved_bytes=None if held is None else held - context,
               next_cuda_reserved_bytes=next_held - context)


def fit(model: MLPSpec | Any, step: StepSpec, memory: int, strategies: list[StepSpec],
        device_kind: str = "cpu", cuda_context: int = CUDA_CONTEXT_BYTES) -> list[Fit]:
    """For ``step`` and then each step in ``strategies``: the largest batch that fits ``memory``
    (on CUDA: whose predicted reserved peak and ``cuda_context`` fit it)."""
    answers = []
    for candidate in [step, *strategies]:
        try:
            if device_kind == "cuda" and candidate.strategy.placement == ONE_DEVICE and not candidate.strategy.compiles:
                answers.append(_search_cuda(model, candidate, memory, cuda_context))
                continue
            answers.append(_search(model, candidate, memory, device_kind))
        except ValueError as error:  # a strategy that cannot run this model (or this batch)
            answers.append(Fit(candidate.strategy.name, None, None, None, str(error).splitlines()[0]))
    return answers
