"""``bpmem fit``: will the step fit, at which batch, and what to turn on when it does not."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from bpmem.cli.options import describe, echo_config, fail, field_message, print_json, specs_from_args
from bpmem.predict.cuda_profile import cudnn_workspace_cap_bytes, current_profile, gaps, view_line
from bpmem.spec import MLPSpec, StepSpec
from bpmem.units import format_bytes, parse_bytes

USER_MODEL_STRATEGIES = ("checkpoint-sqrt", "checkpoint-selective", "microbatch")
CANNOT_SEE = {
    "cpu": ["memory from outside PyTorch's allocator (glibc's arenas, the Python heap)"],
    # and the profile's named gaps (bpmem.predict.cuda_profile), each with its measured size or bound
    "cuda": ["the CUDA context beyond the --cuda-context allowance"],
}


def add_fit_parser(sub: argparse._SubParsersAction, add_model_flags) -> None:  # type: ignore[type-arg]
    fit = sub.add_parser("fit", help="the largest batch size whose predicted peak fits a memory budget",
                         description="Search the batch size with the estimate (never by allocating): the "
                                     "largest batch whose predicted training peak fits --memory, the peak there "
                                     "and at the next batch, and for each strategy the largest batch it reaches. "
                                     "On the CPU the peak held to the budget is the allocator's: the tensors as "
                                     "its 64 B blocks plus each kernel's scratch, calibrated by real steps at "
                                     "B=2, 4 and 8 (their measured error is printed); a model too large for "
                                     "those steps, or on a path the dry run cannot follow, is searched by its "
                                     "tensors' peak, and the answer says why.")
    add_model_flags(fit)
    fit.add_argument("--memory", required=True, metavar="SIZE", help="the budget, e.g. 80GiB or 1500000000")
    fit.add_argument("--device-kind", choices=("cpu", "cuda"), default="cpu",
                     help="cuda: hold the CUDA caching allocator's predicted reserved peak (plus --cuda-context) "
                          "to the budget, from a dry run through a model of the allocator; no GPU needed")
    fit.add_argument("--cuda-context", metavar="SIZE", default="748MiB",
                     help="with --device-kind cuda: memory the process holds outside PyTorch's allocator (the "
                          "CUDA context, library handles); default 748MiB, read off an H200's out-of-memory "
                          "message (torch 2.11, CUDA 13)")
    fit.add_argument("--json", action="store_true", help="max_batch_size and the per-strategy figures as JSON")
    fit.set_defaults(func=cmd_fit)


def _strategies(model: object, step) -> list:  # noqa: ANN001 - StepSpec in, StepSpecs out
    """Every other single-device strategy at its defaults, for the MLP; for a user model, the
    three that most often make a step fit (each costs a search on fake tensors)."""
    from bpmem.strategies import registry
    from bpmem.strategies.base import ONE_DEVICE

    names = [n for n in registry.names(ONE_DEVICE) if registry.REGISTRY[n].predicts_by_arithmetic]
    if not isinstance(model, MLPSpec):
        names = [n for n in names if n in USER_MODEL_STRATEGIES]
    return [dataclasses.replace(step, strategy=registry.make_config(n)) for n in names if n != step.strategy.name]


SCRATCH = "kernels' internal scratch memory (oneDNN's reorders, RNN gates)"


def _print_figures(answers: list) -> None:  # noqa: ANN001 - list of bpmem.predict.fit.Fit
    """Which peak each answer held to the budget: the allocator's, calibrated (with its measured
    error), or the tensors' (and why not the allocator's)."""
    calibrated = [a for a in answers if a.figure == "allocator_peak_bytes"]
    if calibrated:
        errors = ", ".join(f"{a.strategy} {a.calibration_error:+.2%}" for a in calibrated
                           if a.calibration_error is not None)
        ops = sorted({op for a in calibrated for op in a.calibrated_ops if not op.startswith("_record_function")})
        print(f"  peaks: the CPU allocator's, predicted: the dry run's tensors as 64 B blocks plus each kernel's "
              f"scratch, calibrated by real steps at two small batches (ops: {', '.join(ops) or 'none'}); "
              f"error measured at a third batch: {errors}")
    for answer in answers:
        if answer.not_calibrated:
            print(f"  {answer.strategy}: the tensors' peak was searched, not the allocator's: {answer.not_calibrated}")


def _both(nbytes: int | None) -> str:
    return "—" if nbytes is None else f"{format_bytes(nbytes)} ({nbytes:,} B)"


def _why_not(model: object, step: StepSpec, device_kind: str, error: str) -> str:
    """The line for a step that ``fit`` could not size. ``fit`` keeps only the error's text,
    which may be PyTorch's or the model's and name no flag: the first batch's estimate is run
    again so that its exception, traceback and all, goes to bpmem.cli.main, which tells the
    model's error from bpmem's check; a check's "field: why" becomes that field's flag."""
    from bpmem.predict.fit import predicted_peak

    try:
        predicted_peak(model, dataclasses.replace(step, batch_size=1), device_kind)
    except ValueError as again:
        if (message := field_message(again)) is None:
            raise
        return message
    return error  # only a larger batch fails: the text is all there is


def cmd_fit(args: argparse.Namespace) -> int:
    from bpmem.predict.fit import fit
    from bpmem.strategies import registry
    from bpmem.strategies.base import ONE_DEVICE
    from bpmem.sweep.environment import environment

    try:
        memory = parse_bytes(args.memory)
    except ValueError:
        return fail(args.prog, f"argument --memory: {args.memory!r} is not a size; allowed: bytes or a size with "
                                "a unit, e.g. 80GiB")
    if args.batch_size != StepSpec().batch_size:  # never ignored in silence: the search sets it
        return fail(args.prog, f"argument --batch-size: bpmem fit searches the batch size itself (not "
                                f"{args.batch_size}); allowed: leave it out, with --memory the budget")
    model, step = specs_from_args(args)
    if step.mode != "train":
        return fail(args.prog, f"argument --mode: fit sizes a training step; allowed: train (not {step.mode})")
    if step.strategy.placement != ONE_DEVICE:  # its search starts at one row, which no split can share
        return fail(args.prog, f"argument --strategy: bpmem fit searches the batch of one device's step, and "
                                f"{step.strategy.name} splits it over {step.world_size} ranks; allowed: "
                                f"{', '.join(registry.names(ONE_DEVICE))} (for the MLP, bpmem estimate --strategy "
                                f"{step.strategy.name} --batch-size B gives each rank's figures at B)")
    if step.amp != "none" and isinstance(model, MLPSpec) and model.dtype != "float32":  # as measure() refuses it
        return fail(args.prog, f"argument --dtype: {model.dtype} parameters under --amp {step.amp}; autocast keeps "
                                "float32 parameters and casts them itself; allowed: float32 with --amp")
    try:
        context = parse_bytes(args.cuda_context)
    except ValueError:
        return fail(args.prog, f"argument --cuda-context: {args.cuda_context!r} is not a size; allowed: bytes or "
                                "a size with a unit, e.g. 748MiB")
    answers = fit(model, step, memory, _strategies(model, step), args.device_kind, context)
    first = answers[0]
    if first.error:
        return fail(args.prog, _why_not(model, step, args.device_kind, first.error))
    cannot_see = CANNOT_SEE[args.device_kind] + ([SCRATCH] if first.figure == "peak_bytes" and
                                                  args.device_kind == "cpu" else [])
    cuda_view: dict[str, Any] = {}
    if args.device_kind == "cuda":
        import torch

        profile, _ = current_profile()
        cannot_see += gaps(profile)
        cuda_view = {"cuda_view": view_line(torch.cuda.is_available()), "cuda_profile": profile.line(),
                     "cudnn_workspace_cap_bytes": cudnn_workspace_cap_bytes()}
    if args.json:
        print_json({"max_batch_size": first.max_batch_size, "peak_bytes": first.peak_bytes,
                    "next_peak_bytes": first.next_peak_bytes, "figure": first.figure,
                    "allocator_peak_bytes": first.allocator_peak_bytes,
                    "next_allocator_peak_bytes": first.next_allocator_peak_bytes,
                    "calibrated_ops": list(first.calibrated_ops), "calibration_error": first.calibration_error,
                    "not_calibrated": first.not_calibrated, "cuda_reserved_bytes": first.cuda_reserved_bytes,
                    "next_cuda_reserved_bytes": first.next_cuda_reserved_bytes,
                    "cuda_context_bytes": context if args.device_kind == "cuda" else None, "memory_bytes": memory,
                    "device_kind": args.device_kind, "cannot_see": cannot_see, **cuda_view,
                    "strategies": [dataclasses.asdict(a) for a in answers],
                    "config": echo_config(model, step), "environment": environment("cpu")})
        return 0
    print(f"bpmem fit: {describe(model, step)} in {format_bytes(memory)} ({args.device_kind})")
    print(f"  {'strategy':<22} {'largest batch':>14} {'peak there':>26} {'peak at the next batch':>26}")
    for answer in answers:
        if answer.error:
            print(f"  {answer.strategy:<22} {'—':>14}  {answer.error}")
            continue
        found = f"{answer.max_batch_size:,}" if answer.max_batch_size else "none fits"
        allocator = answer.figure in ("allocator_peak_bytes", "cuda_reserved_bytes")
        there, then = ((answer.allocator_peak_bytes, answer.next_allocator_peak_bytes)
                       if answer.figure == "allocator_peak_bytes" else
                       (answer.cuda_reserved_bytes, answer.next_cuda_reserved_bytes)
                       if answer.figure == "cuda_reserved_bytes" else (answer.peak_bytes, answer.next_peak_bytes))
        print(f"  {answer.strategy:<22} {found:>14} {_both(there):>26} {_both(then):>26}"
              f"{'' if allocator or args.device_kind != 'cpu' else '  (tensors)'}")
    _print_figures(answers)
    if args.device_kind == "cuda":
        print(f"  peaks: the CUDA caching allocator's predicted reserved memory (a dry run's allocations through "
              f"bpmem/cuda_allocator), held to the budget with {format_bytes(context)} for the CUDA context "
              f"(--cuda-context); {cuda_view['cuda_view']}")
    print(f"  not counted: {'; '.join(cannot_see)}")
    if any(a.figure == "allocator_peak_bytes" for a in answers):
        print("  the search ran on fake tensors (no memory); only the calibration's steps, at small batches, were real")
    elif not isinstance(model, MLPSpec) or args.device_kind == "cuda" or step.amp != "none":
        print("  peaks from the step run on fake tensors (no memory)")
    else:
        print("  peaks from the analytic replay, and where its peak is only an upper estimate (checkpointing), "
              "from a dry run on fake tensors")
    return 0
