"""``bpmem estimate --model`` and ``bpmem measure --model``: one step of your own model.

The estimate runs the very steps ``measure`` runs, under the same probes, on fake tensors
(shapes, dtypes and the device's kernel choices, but no data and no memory), so the two
agree by construction wherever the fake kernels return what the real ones do.
"""

from __future__ import annotations

import argparse
from typing import Any

from bpmem.cli.options import describe, echo_config, fail, field_message, print_json, print_table, write_trace
from bpmem.figures import FIGURE_NAMES
from bpmem.spec import StepSpec
from bpmem.strategies.base import SplitConfig
from bpmem.units import format_bytes


def run_user_step(args: argparse.Namespace, workload: Any, step: StepSpec, device: str, fake: bool) -> int:
    """Estimate (``fake``) or measure one step of a user model; print a table or --json."""
    from bpmem.measurement.cell import DataDependentModel, is_out_of_memory, measure
    from bpmem.models.user_model import UserModelError
    from bpmem.sweep.environment import environment

    if isinstance(step.strategy, SplitConfig):
        return _split_step(args, workload, step, fake)
    try:
        measured = measure(workload, step, device=device, rss=getattr(args, "rss", False) and not fake, fake=fake,
                           trace=getattr(args, "trace", None) is not None and not fake)
    except UserModelError:
        raise  # bpmem.cli.main says it, with the user's traceback under BPMEM_DEBUG=1
    except DataDependentModel as error:
        return fail(args.prog, str(error))
    except ValueError as error:  # a strategy that cannot apply to this model says why, naming the field
        if (message := field_message(error)) is None:
            raise  # not bpmem's check: the model's own error, which bpmem.cli.main says as one
        return fail(args.prog, message)
    except RuntimeError as error:  # a missing double backward is measure's ValueError, above
        if not is_out_of_memory(error):
            raise
        return fail(args.prog, f"out of memory on {device}: {str(error).strip().splitlines()[0][:200]}; allowed: a "
                                "smaller --batch-size, or bpmem estimate --model ... to size it first")
    figures = {k: v for k, v in measured.to_dict().items() if k != "timeline"}
    write_trace(args, measured.trace)
    allocator, cuda = {}, {}
    if fake and device == "cpu":
        from bpmem.predict.calibrated import allocator_estimate

        allocator = allocator_estimate(workload, step)
        figures.update(allocator)
    if fake and getattr(args, "device_kind", "cpu") == "cuda" and step.mode != "hvp":
        cuda = cuda_estimate(workload, step)
        figures.update(cuda)
    if args.json:
        how = "estimate: fake tensors, no data" if fake else f"measure on {device}"
        print_json({**figures, "how": how, "config": echo_config(workload, step, device),
                    "environment": environment(device)})
        return 0
    verb = "estimate (fake tensors: no data, no memory)" if fake else f"measure on {device}"
    print_table(f"bpmem {verb}: {describe(workload, step)}",
                [(k.removesuffix("_bytes"), figures[k], "") for k in FIGURE_NAMES if k in figures])
    if allocator:
        print_allocator_estimate(allocator)
    if cuda:
        print_cuda_estimate(cuda)
    _print_top_modules(measured.per_layer)
    for caveat in measured.caveats:
        print(f"  caveat: {caveat}")
    return 0


def print_allocator_estimate(allocator: dict[str, Any]) -> None:
    """The estimate's line for the CPU allocator's predicted peak, or why there is none."""
    predicted = allocator.get("predicted_allocator_peak_bytes")
    if predicted is None:
        print(f"  allocator peak: not predicted: {allocator['allocator_not_predicted']}")
        return
    ops = ", ".join(allocator["calibrated_ops"]) or "none"
    batches = " and ".join(map(str, allocator["calibration_batches"]))
    print(f"  allocator peak (CPU, predicted): {format_bytes(predicted)} ({predicted:,} B): the tensors as 64 B "
          f"blocks plus each kernel's scratch, calibrated by real steps at B={batches} "
          f"(ops with scratch: {ops}); error at B={allocator['calibration_check_batch']}: "
          f"{allocator['calibration_error']:+.2%}")


def cuda_estimate(workload: Any, step: StepSpec) -> dict[str, Any]:
    """``estimate --device-kind cuda``'s keys: the step's CUDA blocks and the allocator's figures."""
    import torch

    from bpmem.predict.cuda_profile import cudnn_workspace_cap_bytes, current_profile, gaps, view_line
    from bpmem.predict.cuda_reserved import CUBLAS_WORKSPACE_BYTES, predict_cuda_allocator
    from bpmem.predict.dry_run import predicted_cuda_allocated

    model = predict_cuda_allocator(workload, step, "cuda")
    profile, _ = current_profile()
    allocated = model.step_allocated_bytes if step.mode == "train" and step.world_size == 1 else \
        predicted_cuda_allocated(workload, step, "cuda")
    return {"predicted_cuda_allocated_bytes": allocated,
            "predicted_cuda_reserved_bytes": model.reserved_bytes,
            "predicted_cuda_process_allocated_bytes": model.allocated_bytes,
            "cuda_workspace_bytes_assumed": CUBLAS_WORKSPACE_BYTES,
            "cuda_view": view_line(torch.cuda.is_available()), "cuda_profile": profile.line(),
            "cuda_cannot_see": gaps(profile), "cudnn_workspace_cap_bytes": cudnn_workspace_cap_bytes()}


def print_cuda_estimate(cuda: dict[str, Any]) -> None:
    """The estimate's CUDA lines."""
    print(f"  CUDA: {format_bytes(cuda['predicted_cuda_allocated_bytes'])} "
          f"({cuda['predicted_cuda_allocated_bytes']:,} B) allocated by the step in 512 B blocks; "
          f"{format_bytes(cuda['predicted_cuda_reserved_bytes'])} ({cuda['predicted_cuda_reserved_bytes']:,} B) "
          f"reserved by the caching allocator, its {format_bytes(cuda['cuda_workspace_bytes_assumed'])} cuBLAS "
          "workspace included")
    print(f"  {cuda['cuda_view']}")
    print(f"  not predicted on CUDA: {'; '.join(cuda['cuda_cannot_see'])}")


def _split_step(args: argparse.Namespace, workload: Any, step: StepSpec, fake: bool) -> int:
    """A split strategy on your own model: what it cannot split is said here, in one line
    (exit 2); what it can runs one process per rank, which is torchrun's or a sweep's job."""
    from bpmem.models.user_model import UserModelError

    try:
        step.strategy.check(workload, step)
    except UserModelError:
        raise  # bpmem.cli.main says it
    except ValueError as error:
        if (message := field_message(error)) is None:
            raise
        return fail(args.prog, message)
    name = step.strategy.name
    why = ("bpmem has no per-rank estimate of your own model (no arithmetic of it)" if fake
           else "it runs one process per rank")
    return fail(args.prog, f"argument --strategy: {name} on --model: {why}; allowed: measure it with `bpmem run`, "
                            f"a config of strategies = [\"{name}\"] and [model] factory = \"{workload.factory}\" "
                            f"(one row per rank), or under `torchrun --nproc-per-node {step.world_size} -m "
                            "bpmem.worker --cell JSON --out rows.json`")


def _print_top_modules(per_layer: list[dict[str, Any]], count: int = 8) -> None:
    top = sorted((row for row in per_layer if row["saved_bytes"]), key=lambda row: -row["saved_bytes"])[:count]
    if top:
        print_table("  saved by module (largest first)", [(row["name"], row["saved_bytes"], "") for row in top])
