"""``bpmem estimate`` and ``bpmem measure``: one step of the MLP, predicted or measured."""

from __future__ import annotations

import argparse
from typing import Any

from bpmem.cli.options import (
    describe,
    echo_config,
    fail,
    field_message,
    print_json,
    print_table,
    specs_from_args,
    trace_refusal,
    write_trace,
)
from bpmem.figures import FIGURE_NAMES
from bpmem.spec import MLPSpec, StepSpec
from bpmem.strategies.base import DEVICES, NoStrategy, SplitConfig
from bpmem.units import format_bytes


def cmd_estimate(args: argparse.Namespace) -> int:
    from bpmem.predict.calibrated import allocator_estimate
    from bpmem.predict.dry_run import estimate_exactly
    from bpmem.predict.estimate import estimate
    from bpmem.sweep.environment import environment

    spec, step = specs_from_args(args)
    if args.arithmetic and not isinstance(spec, MLPSpec):  # never a silent dry run where arithmetic was asked
        return fail(args.prog, "argument --arithmetic: the arithmetic models the MLP only; allowed: --arithmetic "
                                "without --model, or --model without --arithmetic (its step on fake tensors)")
    if args.arithmetic and args.allocator:
        return fail(args.prog, "argument --allocator: the allocator's peak comes from a dry run and real steps, "
                                "which --arithmetic never runs; allowed: one of --arithmetic and --allocator")
    if args.arithmetic and step.amp != "none":
        return fail(args.prog, f"argument --arithmetic: the arithmetic replays full precision only, not --amp "
                                f"{step.amp}; allowed: --amp none, or --amp without --arithmetic (a dry run on fake "
                                "tensors)")
    if not isinstance(spec, MLPSpec) or step.amp != "none":
        # your own model, or mixed precision (which the arithmetic does not model yet): the
        # step on fake tensors, under the same probes
        from bpmem.cli.user_commands import run_user_step

        return run_user_step(args, spec, step, "cpu", fake=True)
    if isinstance(step.strategy, SplitConfig):
        return _estimate_split(args, spec, step)
    est = estimate(spec, step) if args.arithmetic else estimate_exactly(spec, step)
    allocator = allocator_estimate(spec, step) if args.allocator else {
        "allocator_not_predicted": "pass --allocator (it runs a dry run and real calibration steps at small batches)"}
    cuda = {}
    if args.device_kind == "cuda" and step.mode != "hvp":
        if args.arithmetic:
            return fail(args.prog, "argument --device-kind: the CUDA view comes from a dry run, which --arithmetic "
                                    "never runs; allowed: --device-kind cuda without --arithmetic")
        from bpmem.cli.user_commands import cuda_estimate

        cuda = cuda_estimate(spec, step)
    if args.json:
        out = {**est.to_dict(), **allocator, **cuda, "config": echo_config(spec, step),
               "environment": environment("cpu")}
        print_json(out)
        return 0
    where = (f"dry run on fake tensors: in {est.peak_phase}" if est.peak_from_dry_run
             else f"exact replay: at {est.peak_op} in {est.peak_phase}" if est.peak_is_exact
             else f"estimated, not replayed ({est.peak_phase})")
    plain_terms = not isinstance(step.strategy, NoStrategy) or step.mode == "hvp"
    print_table(f"bpmem estimate: {describe(spec, step)}", [
        *((("plain " if plain_terms and t.name.startswith("saved") else "") + t.name, t.bytes, t.formula)
          for t in est.terms),
        ("= saved activations (retained)", est.saved_activation_bytes, "what --json reports"),
        (f"peak ({step.mode} step)", est.peak_bytes, where),
        ("inference peak", est.inference_peak_bytes, "eval-mode forward under inference_mode"),
    ])
    from bpmem.cli.user_commands import print_allocator_estimate, print_cuda_estimate

    print_allocator_estimate(allocator)
    if cuda:
        print_cuda_estimate(cuda)
    if est.recompute_flops:
        print(f"  recomputed in backward: {est.recompute_flops:,} matmul FLOPs")
    if step.mode != "inference":
        print(f"  {step.mode} needs {est.training_to_inference_ratio:.2f}x the memory of inference")
    return 0


def _most_per_device(ranks: list[dict[str, Any]]) -> dict[str, int]:
    """The top-level figures of a split strategy's JSON: for each byte figure, the most that
    any one rank (device) holds, which is what has to fit; each rank's own are in "ranks"."""
    names = ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes", "peak_bytes")
    return {name: max(values) for name in names
            if (values := [r[name] for r in ranks if r.get(name) is not None])}


def _estimate_split(args: argparse.Namespace, spec: MLPSpec, step: StepSpec) -> int:
    from bpmem.predict.estimate import estimate_ranks
    from bpmem.sweep.environment import environment

    try:
        ranks = [figures.to_dict() for figures in estimate_ranks(spec, step)]
    except ValueError as error:  # a strategy that cannot split this model says why, naming the field
        if (message := field_message(error)) is None:
            raise
        return fail(args.prog, message)
    if args.json:
        per_rank = [{"rank": r, **figures} for r, figures in enumerate(ranks)]
        print_json({**_most_per_device(ranks), "ranks": per_rank, "config": echo_config(spec, step),
                    "environment": environment("cpu")})
        return 0
    print(f"bpmem estimate: {describe(spec, step)}, {step.strategy.name} over {step.world_size}")
    for rank, figures in enumerate(ranks):
        print_table(f" rank {rank}", [
            (name.removesuffix("_bytes").replace("_", " "), figures[name], note) for name, note in (
                ("params_bytes", ""), ("grads_bytes", ""), ("optimizer_bytes", ""),
                ("saved_activation_bytes", "what the implementation keeps at its most"),
                ("textbook_saved_bytes", "the textbook count (in flight only)"),
                ("peak_bytes", "estimate"), ("comm_bytes", "sent and received per step"))
            if figures.get(name) is not None])
    print(f"  bubble: {ranks[0]['bubble_fraction']:.2f} of the step idle on each rank")
    if step.strategy.placement == DEVICES:
        print("  on separate GPUs; where the stages share one device (a CPU run) no input is copied, and a "
              "stage after a ReLU, tanh or sigmoid keeps one boundary less")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from bpmem.measurement.cell import measure
    from bpmem.sweep.environment import environment

    spec, step = specs_from_args(args)
    device = args.device
    if device.startswith("cuda"):  # where it runs: bpmem.strategies.placement, as in a sweep
        from bpmem.strategies.placement import ONE_DEVICE, Machine, devices_here, parse_device, place

        try:
            parse_device(device)
        except ValueError:
            return fail(args.prog, f"argument --device: {device!r} is not a device; allowed: cpu, cuda, cuda:N")
        machine = Machine.here()
        placement = place(device, 1, ONE_DEVICE, machine)
        if not placement.runs:
            return fail(args.prog, f"argument --device: {placement.skipped}; allowed here: {devices_here(machine)}")
    if trace_refusal(args, step):
        return fail(args.prog, trace_refusal(args, step))
    if not isinstance(spec, MLPSpec):
        from bpmem.cli.user_commands import run_user_step

        return run_user_step(args, spec, step, device, fake=False)
    if isinstance(step.strategy, SplitConfig):
        return _measure_split(args, spec, step, device)
    try:
        measured = measure(spec, step, device=device, rss=args.rss, trace=args.trace is not None)
    except Exception as error:
        if (message := _refusal(spec, step, device, error)) is None:
            raise
        return fail(args.prog, message)
    result = {k: v for k, v in measured.to_dict().items() if k != "timeline"}
    write_trace(args, measured.trace)
    if args.json:
        print_json({**result, "config": echo_config(spec, step, device), "environment": environment(device)})
        return 0
    rows = [(k.removesuffix("_bytes"), result[k], "") for k in (*FIGURE_NAMES, "rss_peak_bytes") if k in result]
    print_table(f"bpmem measure on {device}: {describe(spec, step)}", rows)
    return 0


def _refusal(spec: MLPSpec, step: StepSpec, device: str, error: Exception) -> str | None:
    """The one-line message for an exception that is the user's input, not bpmem's bug, or None:
    a step the strategy or the options cannot run names its field (``--amp`` with ``--dtype``,
    a split that does not fit the model); an allocation that failed is the user's size."""
    from bpmem.measurement.cell import is_out_of_memory

    if isinstance(error, ValueError):
        return field_message(error)
    return _out_of_memory(spec, step, device, error) if is_out_of_memory(error) else None


def _out_of_memory(spec: MLPSpec, step: StepSpec, device: str, error: BaseException) -> str:
    """One line: the step did not fit, what it needs by the estimate, and what to change."""
    import gc

    from bpmem.predict.estimate import estimate

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = cause.split("DefaultCPUAllocator: ", 1)[-1][:200]
    try:
        need = f"; the step needs about {format_bytes(estimate(spec, step).peak_bytes)} (bpmem estimate)"
    except ValueError:
        need = ""
    return (f"out of memory on {device}: {cause}{need}; allowed: a smaller --batch-size, --hidden-dim, "
            "--input-dim or --depth, or a checkpointing --strategy")


def _measure_split(args: argparse.Namespace, spec: MLPSpec, step: StepSpec, device: str) -> int:
    """model-parallel runs here, one row per stage; the others need one process per rank."""
    from bpmem.sweep.environment import environment

    if step.strategy.placement != DEVICES:
        return fail(args.prog, f"argument --strategy: {step.strategy.name} runs one process per rank; run it with "
                                f"`torchrun --nproc-per-node {step.world_size} -m bpmem.worker --cell JSON --out "
                                "rows.json`, or in a `bpmem run` config; allowed here: model-parallel and the "
                                "single-device strategies")

    try:
        stages = [stage.to_dict(drop_none=False)
                  for stage in step.strategy.measure_stages(spec, step, device, warmup=1, repeats=3)]
    except Exception as error:
        if (message := _refusal(spec, step, device, error)) is None:
            raise
        return fail(args.prog, message)
    if args.json:
        print_json({**_most_per_device(stages), "ranks": stages, "config": echo_config(spec, step, device),
                    "environment": environment(device)})
        return 0
    print(f"bpmem measure on {device}: {describe(spec, step)}, model-parallel over {step.world_size}")
    for stage in stages:
        print_table(f" stage {stage['rank']} on {stage['device']}", [
            (name.removesuffix("_bytes"), stage[name], "") for name in (
                "params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes", "peak_bytes")
            if stage[name] is not None])
    print(f"  step time {stages[0]['step_time_median_s'] * 1000:.1f} ms (median)")
    return 0
