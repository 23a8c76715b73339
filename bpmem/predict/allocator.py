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
step runs an op that a fake one does not, such as ``.item()``'s ``_local_scalar_dense``).
Where the calibration's ops do not line up with the dry run's, there is no prediction.
"""

from __future__ import annotations

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


def _aligned(reference: list[str], other: list[str]) -> dict[int, int]:
    """index in ``other`` -> index in ``reference`` for the ops the two runs share in order."""
    matcher = difflib.SequenceMatcher(a=reference, b=other, autojunk=False)
    return {block.b + k: block.a + k for block in matcher.get_matching_blocks() for k in range(block.size)}


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


def calibration_for(spec: MLPSpec | Any, step: StepSpec) -> Calibration:
    """``calibrate``, once per model and step at any batch (a sweep's cells share it)."""
    key = repr((spec, dataclasses.replace(step, batch_size=1)))
    if key not in _CALIBRATIONS:
        _CALIBRATIONS[key] = calibrate(spec, step)
    return _CALIBRATIONS[key]


def predict_allocator_peak(spec: MLPSpec | Any, step: StepSpec,
                           calibration: Calibration | None = None) -> AllocatorPrediction:
    """The dry run at ``step.batch_size``, each op's tensors plus its calibrated excess.

    Raises ValueError when the calibration's ops do not line up with the dry run's."""
    from bpmem.measurement.allocator_step import step_view

    calibration = calibration or calibration_for(spec, step)
    dry = step_view(spec, step, fake=True)
    to_calibration = _aligned(list(calibration.ops), [o.op for o in dry.ops])
    missing = [i for i, pair in enumerate(calibration.excess) if any(pair) and i not in to_calibration.values()]
    if missing:
        raise ValueError(f"model: the dry run does not run the calibrated op {calibration.ops[missing[0]]} "
                         "where a real step does; allowed: bpmem measure, which traces the allocator itself")
    peak, peak_op = dry.tensor_peak_blocks, ""
    for index, op in enumerate(dry.ops):
        extra = calibration.excess_at(to_calibration[index], step.batch_size) if index in to_calibration else 0
        if op.tensor_bytes + extra > peak:
            peak, peak_op = op.tensor_bytes + extra, op.op
    return AllocatorPrediction(peak, dry.tensor_peak_blocks, calibration, peak_op)
