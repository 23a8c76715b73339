"""``predicted_allocator_peak_bytes``: the CPU allocator's peak of a step, before it runs.

The dry run (fake tensors, ``bpmem.measurement.allocator_step.step_view(fake=True)``) gives,
for each aten op i of the step, the tensors' blocks live just after it, D_i(B). What it cannot
give is what the op's kernel allocates inside itself and frees before it returns: oneDNN's
reordered weights and blocked outputs, an RNN's gates, the nested tensors of an eval-mode
``TransformerEncoder``, the 0-dim tensors that wrap Python scalars. That excess, X_i(B), has no
rule that holds across oneDNN's algorithm choices, thread counts and torch versions, so it is
**calibrated**: one real step at each of two small batches (``CALIBRATION_BATCHES``) under the
allocator's own trace gives X_i at both, op by op, and X_i(B) is the straight line through
them (clipped at 0, in 64 B blocks). The prediction is

    predicted_allocator_peak_bytes = max( max_i D_i(B) + X_i(B),  the tensors' peak in blocks )

The calibration's own error is measured at a third batch (``CHECK_BATCH``): its prediction
against a real step's trace there. Which ops were calibrated (a non-zero excess) is kept.

Ops are matched between runs by their order and names (``difflib`` aligns them where a real
step runs an op that a fake one does not, such as ``.item()``'s ``_local_scalar_dense``). The
dry run's metadata queries (``prim::device``, which fake tensors answer through the dispatcher
and real ones do not) are not kernels and are left out of the match. A calibrated op that the
dry run does not run has its excess charged to the nearest op the two runs share, the one
before it where there is one: that is where a real step would be as it allocates. Where a
real step takes PyTorch's eval fast path (fused attention layers, nested tensors), the dry run
cannot follow it, and there is no prediction.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from bpmem.spec import ONE_DEVICE, MLPSpec, StepSpec

CALIBRATION_BATCHES = (2, 4)  # BatchNorm in training needs two samples per channel
CHECK_BATCH = 8
# microbatch cuts the batch in k: its batches are k times these, so every run has k micro-batches
BLOCK = 64


@dataclass(frozen=True)
class Calibration:
    """Each op's excess over the tensors, measured at two batches, and the check at a third."""

    ops: tuple[str, ...]
    batches: tuple[int, int]
    excess: tuple[tuple[int, int], ...]  # per op: X_i at each calibration batch (bytes)
    check_batch: int = 0
    check_error: float | None = None  # (predicted - measured) / measured at check_batch

    def excess_at(self, index: int, batch_size: int) -> int:
        """X_i(B), the straight line through the two measured points, as whole 64 B blocks."""
        (b1, b2), (x1, x2) = self.batches, self.excess[index]
        value = x1 + (x2 - x1) * (batch_size - b1) / (b2 - b1)
        return max(0, -(-int(round(value)) // BLOCK) * BLOCK)

    @property
    def calibrated_ops(self) -> tuple[str, ...]:
        """The ops whose excess was not zero at either batch, each name once, in order."""
        names = [op for op, pair in zip(self.ops, self.excess, strict=True) if any(pair)]
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class AllocatorPrediction:
    """The predicted allocator peak of one step, and the calibration it rests on."""

    allocator_peak_bytes: int
    tensor_peak_blocks: int  # the dry run's tensors alone, as 64 B blocks
    calibration: Calibration
    peak_op: str  # the op at which the prediction peaks


# the eval fast path of TransformerEncoder and MultiheadAttention: fused, on nested tensors
FAST_PATH_OPS = frozenset({"_nested_tensor_from_mask", "_transformer_encoder_layer_fwd",
                           "_native_multi_head_attention", "to_padded_tensor"})
METADATA_OPS = frozenset({"device"})  # answered by fake tensors through the dispatcher; no kernel runs


def _aligned(reference: list[str], other: list[str]) -> dict[int, int]:
    """index in ``other`` -> index in ``reference`` for the kernels the two runs share in order."""
    ref = [i for i, op in enumerate(reference) if op not in METADATA_OPS]
    oth = [i for i, op in enumerate(other) if op not in METADATA_OPS]
    ref_ops, oth_ops = [reference[i] for i in ref], [other[i] for i in oth]
    if ref_ops == oth_ops:  # the usual case: the same kernels, in the same order
        return dict(zip(oth, ref, strict=True))
    matcher = difflib.SequenceMatcher(a=ref_ops, b=oth_ops, autojunk=False)
    return {oth[block.b + k]: ref[block.a + k] for block in matcher.get_matching_blocks() for k in range(block.size)}


def _nearest_shared(index: int, shared: list[int]) -> int | None:
    """The shared calibration index nearest ``index``: the one before it, else the one after."""
    position = bisect.bisect_right(shared, index)
    if position > 0:
        return shared[position - 1]
    return shared[0] if shared else None


def applies(spec: MLPSpec | Any, step: StepSpec, device: str) -> bool:
    """The CPU's one-device train and inference steps; compiled steps run eagerly under a
    dispatch mode, so their ops are not the ones that run."""
    return (device == "cpu" and step.mode in ("train", "inference") and not step.strategy.compiles
            and step.strategy.placement == ONE_DEVICE)


def calibrate(spec: MLPSpec | Any, step: StepSpec, check: bool = True) -> Calibration:
    """Real steps at ``CALIBRATION_BATCHES`` (and ``CHECK_BATCH`` for the check) on the CPU."""
    from bpmem.measurement.allocator_step import step_view

    scale = max(1, int(getattr(step.strategy, "microbatches", 0) or 0))
    batches = (CALIBRATION_BATCHES[0] * scale, CALIBRATION_BATCHES[1] * scale)
    views = [step_view(spec, dataclasses.replace(step, batch_size=b)) for b in batches]
    ops = [o.op for o in views[0].ops]
    at_second = _aligned(ops, [o.op for o in views[1].ops])
    second = {at_second[i]: o.excess_bytes for i, o in enumerate(views[1].ops) if i in at_second}
    excess = tuple((o.excess_bytes, second.get(i, o.excess_bytes)) for i, o in enumerate(views[0].ops))
    calibration = Calibration(tuple(ops), batches, excess)
    if not check:
        return calibration
    at_check = dataclasses.replace(step, batch_size=CHECK_BATCH * scale)
    measured = step_view(spec, at_check).allocator_peak_bytes
    predicted = predict_allocator_peak(spec, at_check, calibration)
    error = (predicted.allocator_peak_bytes - measured) / measured if measured else 0.0
    return dataclasses.replace(calibration, check_batch=at_check.batch_size, check_error=error)


_CALIBRATIONS: dict[str, Calibration] = {}


def calibration_for(spec: MLPSpec | Any, step: StepSpec, check: bool = False) -> Calibration:
    """``calibrate``, once per model and step at any batch (a sweep's cells share it); with
    ``check``, one that has measured its error (``fit`` reports it; a sweep needs none)."""
    key = repr((spec, dataclasses.replace(step, batch_size=1)))
    known = _CALIBRATIONS.get(key)
    if known is None or (check and known.check_error is None):
        _CALIBRATIONS[key] = calibrate(spec, step, check=check)
    return _CALIBRATIONS[key]


def predict_allocator_peak(spec: MLPSpec | Any, step: StepSpec,
                           calibration: Calibration | None = None) -> AllocatorPrediction:
    """The dry run at ``step.batch_size``, each op's tensors plus its calibrated excess.

    Raises ValueError where a real step takes PyTorch's eval fast path (``FAST_PATH_OPS``),
    which the dry run, on fake tensors, cannot."""
    from bpmem.measurement.allocator_step import step_view

    calibration = calibration or calibration_for(spec, step)
    dry = step_view(spec, step, fake=True)
    fast = sorted(FAST_PATH_OPS.intersection(calibration.ops).difference(o.op for o in dry.ops))
    if fast:
        raise ValueError(f"model: in eval mode it takes PyTorch's fast path ({fast[0]}), which a dry run cannot "
                         "follow (nested tensors' sizes come from the padding mask's values); allowed: bpmem measure "
                         "--model, which traces the allocator itself")
    to_calibration = _aligned(list(calibration.ops), [o.op for o in dry.ops])
    extra = {index: calibration.excess_at(at, step.batch_size) for index, at in to_calibration.items()}
    to_dry = {at: index for index, at in to_calibration.items()}
    shared = sorted(to_dry)
    for at, pair in enumerate(calibration.excess):  # a calibrated kernel the dry run does not run
        nearest = _nearest_shared(at, shared) if any(pair) and at not in to_dry else None
        if nearest is not None:
            index = to_dry[nearest]
            extra[index] = max(extra[index], calibration.excess_at(at, step.batch_size))
    peak, peak_op = dry.tensor_peak_blocks, ""
    for index, op in enumerate(dry.ops):
        if op.tensor_bytes + extra.get(index, 0) > peak:
            peak, peak_op = op.tensor_bytes + extra.get(index, 0), op.op
    return AllocatorPrediction(peak, dry.tensor_peak_blocks, calibration, peak_op)
