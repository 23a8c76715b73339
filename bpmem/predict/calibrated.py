"""The allocator's predicted peak where a calibration may run: ``fit`` and ``estimate`` ask here.

A calibration (``bpmem.predict.allocator.calibrate``) runs real steps at B = 2, 4 and 8 (times
the micro-batch count). For a model sized for a GPU that could take more memory than this
machine has, so it runs only where the dry run's peak at its largest batch takes at most
``CALIBRATION_SHARE`` of the memory available now; elsewhere the answer says why not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from bpmem.predict.allocator import CHECK_BATCH, Calibration, applies, calibration_for, predict_allocator_peak
from bpmem.spec import StepSpec

CALIBRATION_SHARE = 0.5  # calibrate only where the check step's peak takes at most this of free memory


def guarded_calibration(spec: Any, step: StepSpec,
                        tensor_peak: Callable[[int], int] | None = None) -> tuple[Calibration | None, str]:
    """(the checked calibration, "") for ``step`` on the CPU, or (None, why there is none).
    ``tensor_peak`` (batch -> the dry run's tensor peak, as ``fit`` has it) sizes the check
    step without a dry run of its own."""
    import psutil

    from bpmem.measurement.allocator_step import step_view

    if not applies(spec, step, "cpu"):
        return None, (f"a {step.mode} step with {step.strategy.name} has no allocator prediction (only the CPU's "
                      "train and inference steps on one device, not compiled)")
    scale = max(1, int(getattr(step.strategy, "microbatches", 0) or 0))
    at_check = dataclasses.replace(step, batch_size=CHECK_BATCH * scale)
    needed = tensor_peak(at_check.batch_size) if tensor_peak is not None else \
        step_view(spec, at_check, fake=True).tensor_peak_blocks
    available = psutil.virtual_memory().available
    if needed > CALIBRATION_SHARE * available:
        return None, (f"calibrating needs a real step of {needed:,} B at B={at_check.batch_size}, more than "
                      f"{CALIBRATION_SHARE:.0%} of the {available:,} B available")
    try:
        return calibration_for(spec, step, check=True), ""
    except ValueError as error:
        return None, str(error).splitlines()[0]


def allocator_estimate(spec: Any, step: StepSpec) -> dict[str, Any]:
    """The estimate's allocator keys: ``predicted_allocator_peak_bytes``, the calibrated ops, the
    calibration's batches and its error measured at the check batch; or, where there is no
    prediction, ``allocator_not_predicted`` alone, saying why (byte keys are always integers)."""
    calibration, why_not = guarded_calibration(spec, step)
    if calibration is not None:
        try:
            predicted = predict_allocator_peak(spec, step, calibration).allocator_peak_bytes
        except ValueError as error:  # a path the dry run cannot follow
            calibration, why_not = None, str(error).splitlines()[0]
    if calibration is None:
        return {"allocator_not_predicted": why_not}
    return {"predicted_allocator_peak_bytes": predicted,
            "calibrated_ops": [op for op in calibration.calibrated_ops if not op.startswith("_record_function")],
            "calibration_batches": list(calibration.batches), "calibration_check_batch": calibration.check_batch,
            "calibration_error": calibration.check_error}
