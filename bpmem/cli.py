"""The ``bpmem`` command line: argparse front end over estimate and measure.

Every error is one line naming the flag and what it accepts, with exit status 2 and no
traceback. Option builders live here so later front ends (the sweep config, the pytest
plugin) can share them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, NoReturn

from bpmem.spec import (
    ACTIVATIONS,
    BUDGET_ALLOWED,
    DTYPES,
    LOSSES,
    MODES,
    OPTIMIZERS,
    POLICIES,
    SPLIT_STRATEGIES,
    STRATEGIES,
    InfeasibleBudget,
    MLPSpec,
    SpecError,
    StepSpec,
    parse_budget,
)
from bpmem.units import format_bytes

FIGURES_HELP = """\
figures (bytes; printed in IEC units, exact integers with --json):
  params_bytes            parameter storages: every Linear's weight (out x in) and bias
  grads_bytes             the .grad storages after backward (same size as params)
  optimizer_bytes         optimizer state: sgd 0, sgd-momentum 1x params,
                          adam 2x params plus one 0-dim 'step' tensor per parameter
  saved_activation_bytes  distinct storages autograd keeps for backward: the input
                          batch, each hidden activation (twice for gelu: input and
                          output), the loss internals; parameters excluded
  peak_bytes              largest total of live tensor storages during one steady-state
                          step: zero_grad(set_to_none), forward, backward, optimizer.step
  inference_peak_bytes    the same for one forward under torch.inference_mode()
  per_layer               saved bytes by module, plus 'loss' and 'regularizer'
"""


RUN_HELP = """\
config (TOML; every key optional, a list under [model] is a grid axis):
  name = "quick"                                   run folder prefix
  batch_sizes = [1, 16, 256]                       or { start = 1, stop = 4096, factor = 4 }
  devices = ["cpu"]                                cpu, cuda, cuda:N, or "auto" (every GPU)
  modes = ["train", "inference"]                   or "all"
  strategies = ["none"]                            or "all"
  repeats = 5                                      timed steps per cell (median, IQR)
  warmup = 1                                       untimed steps before them
  continue_after_oom = false                       still try larger batches after an OOM
  [model]                                          any model flag, plus optimizer
  depth = [1, 8]

status per row: ok, oom (out of memory; larger batches of the series are then
skipped), error (message in the error column), skipped.
Ctrl-C stops cleanly: finished rows stay, and --resume runs the rest.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is a single line that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; allowed: an integer >= 1")
    return value


def _budget(text: str) -> float | int:
    try:
        return parse_budget(text)
    except SpecError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a budget; allowed: {BUDGET_ALLOWED}") from None


def _shard(text: str) -> Any:
    from bpmem.merge import Shard

    try:
        return Shard.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: a number >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; allowed: a finite number >= 0")
    return value


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model and step flags (README, "The commands"); defaults are the seed's network."""
    d, t = MLPSpec(), StepSpec()
    g = parser.add_argument_group("model (defaults: the seed's 784-256-10 network on MNIST-sized data)")
    g.add_argument("--input-dim", type=_positive_int, default=d.input_dim, metavar="D", help="input features d")
    g.add_argument("--hidden-dim", type=_positive_int, default=d.hidden_dim, metavar="H", help="hidden width h")
    g.add_argument("--output-dim", type=_positive_int, default=d.output_dim, metavar="Q", help="outputs q")
    g.add_argument("--depth", type=_positive_int, default=d.depth, help="hidden layers (1 = the seed)")
    g.add_argument("--bias", action=argparse.BooleanOptionalAction, default=d.bias,
                   help="bias on every Linear (the seed's exercise 2)")
    g.add_argument("--activation", choices=ACTIVATIONS, default=d.activation, help="phi")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype, help="parameter and activation dtype")
    g.add_argument("--loss", choices=LOSSES, default=d.loss, help="l(o, y)")
    g.add_argument("--l2", type=_non_negative_float, default=d.l2, metavar="LAMBDA",
                   help="lambda of s = lambda/2 * sum ||W||_F^2")
    g = parser.add_argument_group("step")
    g.add_argument("--batch-size", type=_positive_int, default=t.batch_size, metavar="B", help="rows per batch")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=t.optimizer, help="torch.optim choice")
    g.add_argument("--mode", choices=MODES, default=t.mode, help="train: full step; inference: forward only")
    g.add_argument("--strategy", choices=STRATEGIES, default=t.strategy,
                   help="memory strategy (checkpointing variants, compile-budget; see below)")
    g.add_argument("--segments", type=_positive_int, default=t.segments, metavar="K",
                   help="checkpoint-segments: number of uniform checkpointed segments")
    g.add_argument("--microbatches", type=_positive_int, default=t.microbatches, metavar="K",
                   help="microbatch: micro-batches per step, gradients accumulated")
    g.add_argument("--budget", type=_budget, default=t.budget, metavar="BYTES|FRACTION",
                   help="checkpoint-budget / compile-budget: a fraction of the plain step's retained bytes "
                        "in (0, 1] (0.5), or bytes with a unit ('64MiB') or as an integer >= 2 (1000000)")
    g.add_argument("--policy", choices=POLICIES, default=t.policy,
                   help="checkpoint-selective: keep matmul outputs or activation outputs")
    g.add_argument("--world-size", type=_positive_int, default=t.world_size, metavar="N",
                   help="split strategies (ddp, fsdp, tensor-parallel, pipeline-*, model-parallel): ranks or "
                        "devices, >= 2; the pipelines also take --microbatches")


def specs_from_args(args: argparse.Namespace) -> tuple[MLPSpec, StepSpec]:
    values = vars(args)
    spec = MLPSpec(**{f.name: values[f.name] for f in fields(MLPSpec)})
    step = StepSpec(**{f.name: values[f.name] for f in fields(StepSpec) if f.name in values})
    return spec, step


def _config(spec: MLPSpec, step: StepSpec, device: str | None = None) -> dict[str, Any]:
    config = {**asdict(spec), **asdict(step)}
    if device is not None:
        config["device"] = device
    return config


def _print_table(title: str, rows: list[tuple[str, int, str]]) -> None:
    print(title)
    width = max(len(name) for name, _, _ in rows)
    for name, nbytes, note in rows:
        print(f"  {name:<{width}}  {format_bytes(nbytes):>11}  {nbytes:>15,} B  {note}")


def _describe(spec: MLPSpec, step: StepSpec) -> str:
    dims = "-".join(str(n) for n in [spec.input_dim] + [spec.hidden_dim] * spec.depth + [spec.output_dim])
    return (f"{dims}, {'bias' if spec.bias else 'no bias'}, {spec.activation}, {spec.loss}, {spec.dtype}, "
            f"B={step.batch_size}, {step.optimizer}, {step.mode}")


def cmd_estimate(args: argparse.Namespace) -> int:
    from bpmem.environment import environment
    from bpmem.estimate import estimate

    spec, step = specs_from_args(args)
    if step.strategy in SPLIT_STRATEGIES:
        return _estimate_split(args, spec, step)
    est = estimate(spec, step)
    if args.json:
        out = {**est.to_dict(), "config": _config(spec, step), "environment": environment("cpu")}
        out["terms"] = [asdict(t) for t in est.terms]
        print(json.dumps(out, indent=2))
        return 0
    where = (f"exact replay: at {est.peak_op} in {est.peak_phase}" if est.peak_is_exact
             else f"estimated, not replayed ({est.peak_phase})")
    plain_terms = step.strategy != "none" or step.mode == "hvp"
    _print_table(f"bpmem estimate: {_describe(spec, step)}", [
        *((("plain " if plain_terms and t.name.startswith("saved") else "") + t.name, t.bytes, t.formula)
          for t in est.terms),
        ("= saved activations (retained)", est.saved_activation_bytes, "what --json reports"),
        (f"peak ({step.mode} step)", est.peak_bytes, where),
        ("inference peak", est.inference_peak_bytes, "forward under inference_mode"),
    ])
    if est.recompute_flops:
        print(f"  recomputed in backward: {est.recompute_flops:,} matmul FLOPs")
    if step.mode != "inference":
        print(f"  {step.mode} needs {est.training_to_inference_ratio:.2f}x the memory of inference")
    return 0


def _split_predictions(spec: MLPSpec, step: StepSpec) -> list[dict[str, Any]]:
    """Per-rank (per-device) predictions of a split strategy; ValueError names a bad field."""
    if step.strategy == "model-parallel":
        from bpmem.strategies.model_parallel import check, predict_stages

        check(spec, step)
        return predict_stages(spec, step, separate_devices=True)
    from bpmem.strategies.distributed import check, predict_rank

    check(spec, step, step.world_size)
    return [predict_rank(spec, step, rank, step.world_size) for rank in range(step.world_size)]


def _most_per_device(ranks: list[dict[str, Any]]) -> dict[str, int]:
    """The top-level figures of a split strategy's JSON: for each byte figure, the most that
    any one rank (device) holds, which is what has to fit; each rank's own are in "ranks"."""
    names = ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes", "peak_bytes")
    return {name: max(values) for name in names
            if (values := [r[name] for r in ranks if r.get(name) is not None])}


def _estimate_split(args: argparse.Namespace, spec: MLPSpec, step: StepSpec) -> int:
    from bpmem.environment import environment

    try:
        ranks = _split_predictions(spec, step)
    except ValueError as error:
        return _fail_field(args.prog, error)
    if args.json:
        per_rank = [{"rank": r, **figures} for r, figures in enumerate(ranks)]
        print(json.dumps({**_most_per_device(ranks), "ranks": per_rank, "config": _config(spec, step),
                          "environment": environment("cpu")}, indent=2))
        return 0
    print(f"bpmem estimate: {_describe(spec, step)}, {step.strategy} over {step.world_size}")
    for rank, figures in enumerate(ranks):
        _print_table(f" rank {rank}", [
            (name.removesuffix("_bytes").replace("_", " "), figures[name], note) for name, note in (
                ("params_bytes", ""), ("grads_bytes", ""), ("optimizer_bytes", ""),
                ("saved_activation_bytes", "what the implementation keeps at its most"),
                ("textbook_saved_bytes", "the textbook count (in flight only)"),
                ("peak_bytes", "estimate"), ("comm_bytes", "sent and received per step"))
            if figures.get(name) is not None])
    print(f"  bubble: {ranks[0]['bubble_fraction']:.2f} of the step idle on each rank")
    if step.strategy == "model-parallel":
        print("  on separate GPUs; where the stages share one device (a CPU run) no input is copied, and a "
              "stage after a ReLU, tanh or sigmoid keeps one boundary less")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    import torch

    from bpmem.environment import environment
    from bpmem.measure_cell import is_out_of_memory, measure

    spec, step = specs_from_args(args)
    device = args.device
    if device.startswith("cuda"):
        try:
            torch.device(device)
        except RuntimeError:
            return _fail(args.prog, f"argument --device: {device!r} is not a device; allowed: cpu, cuda, cuda:N")
        if not torch.cuda.is_available():
            return _fail(args.prog, f"argument --device: {device} needs CUDA, and torch.cuda.is_available() "
                                    "is False; allowed here: cpu")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            return _fail(args.prog, f"argument --device: {device} does not exist; allowed: cpu, "
                                    + ", ".join(f"cuda:{i}" for i in range(torch.cuda.device_count())))
    if step.strategy in SPLIT_STRATEGIES:
        return _measure_split(args, spec, step, device)
    try:
        result = measure(spec, step, device=device, rss=args.rss)
    except Exception as error:  # an allocation that failed is the user's size, not a crash
        if not is_out_of_memory(error):
            raise
        return _fail(args.prog, _out_of_memory(spec, step, device, error))
    result.pop("timeline", None)
    if args.json:
        print(json.dumps({**result, "config": _config(spec, step, device), "environment": environment(device)},
                         indent=2))
        return 0
    rows = [(k.removesuffix("_bytes"), result[k], "") for k in (
        "params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes", "peak_bytes",
        "inference_peak_bytes", "cuda_max_allocated_bytes", "cuda_max_reserved_bytes", "rss_peak_bytes",
    ) if k in result]
    _print_table(f"bpmem measure on {device}: {_describe(spec, step)}", rows)
    return 0


def _out_of_memory(spec: MLPSpec, step: StepSpec, device: str, error: BaseException) -> str:
    """One line: the step did not fit, what it needs by the estimate, and what to change."""
    import gc

    from bpmem.estimate import estimate

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
    from bpmem.environment import environment
    from bpmem.strategies.model_parallel import measure_stages

    if step.strategy != "model-parallel":
        return _fail(args.prog, f"argument --strategy: {step.strategy} runs one process per rank; run it with "
                                f"`torchrun --nproc-per-node {step.world_size} -m bpmem.worker --cell JSON --out "
                                "rows.json`, or in a `bpmem run` config; allowed here: model-parallel and the "
                                "single-device strategies")
    from bpmem.measure_cell import is_out_of_memory

    try:
        stages = measure_stages(spec, step, device, warmup=1, repeats=3)
    except ValueError as error:
        return _fail_field(args.prog, error)
    except Exception as error:  # an allocation that failed is the user's size, not a crash
        if not is_out_of_memory(error):
            raise
        return _fail(args.prog, _out_of_memory(spec, step, device, error))
    if args.json:
        print(json.dumps({**_most_per_device(stages), "ranks": stages, "config": _config(spec, step, device),
                          "environment": environment(device)}, indent=2))
        return 0
    print(f"bpmem measure on {device}: {_describe(spec, step)}, model-parallel over {step.world_size}")
    for stage in stages:
        _print_table(f" stage {stage['rank']} on {stage['device']}", [
            (name.removesuffix("_bytes"), stage[name], "") for name in (
                "params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes", "peak_bytes")
            if stage[name] is not None])
    print(f"  step time {stages[0]['step_time_median_s'] * 1000:.1f} ms (median)")
    return 0


def _latest_run(root: Path, name: str) -> Path | None:
    runs = sorted((p for p in root.glob(f"{name}-*") if (p / "run.json").exists()), key=lambda p: p.name)
    return runs[-1] if runs else None


def cmd_run(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from bpmem.config import ConfigError, load_config, resolve_devices
    from bpmem.sweep import run_sweep

    try:
        config = load_config(args.config)
        devices = resolve_devices(config.devices)
    except ConfigError as error:
        source = args.config if args.config and not str(error).startswith("--config") else None
        return _fail(args.prog, f"{source}: {error}" if source else f"{error}")
    if args.jobs < 1:
        return _fail(args.prog, f"argument --jobs: {args.jobs} is not allowed; allowed: an integer >= 1")
    if args.resume and args.overwrite:
        return _fail(args.prog, "argument --overwrite: not allowed with --resume (one continues a run, the other "
                                "replaces it); allowed: one of them")
    now = datetime.now(UTC)
    if args.resume:
        out = args.out or _latest_run(Path("reports"), config.name)
        if out is None or not (out / "run.json").exists():
            where = str(args.out) if args.out else f"reports/{config.name}-*"
            return _fail(args.prog, f"argument --resume: no earlier run of {config.name!r} in {where}")
        run_info = json.loads((out / "run.json").read_text())
        if run_info.get("config") != json.loads(json.dumps(config.to_dict())):
            return _fail(args.prog, f"argument --resume: {out} was made by another config; pass the same --config")
        if run_info.get("shard") != (str(args.shard) if args.shard else None):
            was = run_info.get("shard") or "none (the whole grid)"
            return _fail(args.prog, f"argument --shard: {out} is shard {was}; allowed: the same --shard as the run "
                                    "being resumed")
    else:
        shard_name = f"-shard{args.shard.index}of{args.shard.count}" if args.shard else ""
        default = Path("reports") / f"{config.name}-{now:%Y%m%d-%H%M%S}{shard_name}"
        try:
            out = _new_run_folder(args.out, default, args.overwrite)
        except FileExistsError:
            return _fail(args.prog, f"argument --out: {args.out} already holds results.csv; allowed: --resume to "
                                    "continue it, --overwrite to replace it, or another --out")
        same_second = out.name.removeprefix(default.name) if args.out is None else ""  # "", "-2", ...
        run_info = {"run_id": f"{config.name}-{now:%Y%m%dT%H%M%SZ}{same_second}",
                    "created": now.isoformat(timespec="seconds"), "config": config.to_dict(),
                    **({"shard": str(args.shard)} if args.shard else {})}
        (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    if not args.quiet:
        cells = args.shard.cells(config.cells(devices)) if args.shard else config.cells(devices)
        part = f" (shard {args.shard} of the grid)" if args.shard else ""
        print(f"bpmem run: {len(cells)} cells of {config.name!r}{part} on {', '.join(devices)} -> {out}",
              file=sys.stderr)
    outcome = run_sweep(config, devices, out, run_info["run_id"], jobs=args.jobs, quiet=args.quiet, shard=args.shard)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(outcome.statuses.items())) or "nothing new"
    done = f" ({outcome.already_done} already done)" if outcome.already_done else ""
    print(f"bpmem run: {counts}{done}; results in {out / 'results.csv'}", file=sys.stderr)
    if (outcome.written or outcome.already_done) and not args.no_report:
        _report(out, args.quiet)
    if outcome.interrupted:
        print(f"bpmem run: stopped early; continue with: bpmem run --resume --out {out}"
              + (f" --config {args.config}" if args.config else ""), file=sys.stderr)
        return 130
    return 0


# what a run writes into its folder; --overwrite removes all of it, so nothing of the old run stays
RUN_OUTPUTS: tuple[str, ...] = ("results.csv", "timelines.csv", "report.md", "run.json", "plots", "logs")


def _new_run_folder(asked: Path | None, default: Path, overwrite: bool) -> Path:
    """Create the run folder. The default name gets -2, -3, ... when a run started in the
    same second already took it (mkdir is atomic, so two runs never share one). An
    ``--out`` that holds results raises FileExistsError unless ``overwrite``, which
    clears every output of the old run first."""
    import shutil

    if asked is None:
        for suffix in ["", *(f"-{n}" for n in range(2, 1000))]:
            folder = default.with_name(default.name + suffix)
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                continue
        raise FileExistsError(default)
    if (asked / "results.csv").exists():
        if not overwrite:
            raise FileExistsError(asked)
        for name in RUN_OUTPUTS:
            target = asked / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    asked.mkdir(parents=True, exist_ok=True)
    return asked


def _report(directory: Path, quiet: bool) -> Path:
    from bpmem.report import report

    path = report(directory)
    if not quiet:
        print(f"bpmem report: {path} and {directory / 'plots'}/", file=sys.stderr)
    return path


def cmd_report(args: argparse.Namespace) -> int:
    from bpmem.merge import merge_runs
    from bpmem.results import ResultsFileError

    for folder in args.directory:
        if not (folder / "results.csv").exists():
            return _fail(args.prog, f"argument DIR: {folder} has no results.csv; allowed: a folder that "
                                    "`bpmem run` wrote")
    if len(args.directory) > 1 and args.out is None:
        return _fail(args.prog, "argument --out: several run folders are merged into one; allowed: --out MERGED, "
                                "a new folder for the merged results.csv and report")
    directory = args.out if len(args.directory) > 1 else args.directory[0]
    try:
        if len(args.directory) > 1:
            merge_runs(args.directory, directory)
        path = _report(directory, quiet=True)
    except ResultsFileError as error:
        return _fail(args.prog, f"argument DIR: {error}")
    print(f"bpmem report: wrote {path} and {directory / 'plots'}/")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from bpmem.check import CheckInputError, RuleError, compare, parse_rule, render

    try:
        rules = [parse_rule(text) for text in (args.fail or ["saved:0%", "peak:0%"])]
    except RuleError as error:
        return _fail(args.prog, f"argument --fail: {error}")
    from bpmem.merge import results_path

    for flag, paths in (("--baseline", args.baseline), ("--results", args.results)):
        for path in paths:
            if not results_path(path).is_file():
                return _fail(args.prog, f"argument {flag}: {path} is not a results.csv or a run folder with one; "
                                        "allowed: a results.csv, or a folder that `bpmem run` wrote")
    try:
        comparison = compare(args.baseline, args.results, rules, strict=args.strict)
    except CheckInputError as error:
        return _fail(args.prog, str(error))
    print(render(comparison, show_all=args.all))
    return 1 if comparison.failed else 0


def cmd_graph(args: argparse.Namespace) -> int:
    from bpmem.graph import write_graph

    spec, step = specs_from_args(args)
    path = write_graph(spec, step.batch_size, args.out)
    print(f"bpmem graph: wrote {path}")
    return 0


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _fail_field(prog: str, error: ValueError) -> int:
    """A strategy check's "field: why; allowed: ..." as an error on that field's flag."""
    field, _, rest = str(error).partition(": ")
    return _fail(prog, f"argument --{field.replace('_', '-')}: {rest}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bpmem", description=(
        "Where training memory goes, measured. bpmem predicts (estimate) and measures (measure) "
        "the bytes of one MLP step: parameters, gradients, optimizer state, the activations "
        "autograd saves for backward, and the peak."), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 success; 1 a memory regression (check); 2 bad input (a flag, config, file, "
               "budget, a step that does not fit, nothing to compare); 3 an internal error (a bug: one line, "
               "BPMEM_DEBUG=1 shows the traceback); 130 stopped by Ctrl-C.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('bpmem').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    est = sub.add_parser("estimate", help="predict every figure from autograd's rules, no tensors",
                         description="Predict each figure analytically: no tensors are allocated, so any "
                                     "size answers at once.", epilog=FIGURES_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(est)
    est.add_argument("--json", action="store_true", help="print one JSON object with exact integer bytes")
    est.set_defaults(func=cmd_estimate)
    mea = sub.add_parser("measure", help="run real steps and read the figures off the probes",
                         description="Run a warm-up step, then one step per probe: SavedTensorProbe "
                                     "(saved activations), LiveTensorProbe (peak), CudaProbe on CUDA.",
                         epilog=FIGURES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(mea)
    mea.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    mea.add_argument("--rss", action="store_true", help="also sample the process RSS with psutil (coarse)")
    mea.add_argument("--json", action="store_true", help="print one JSON object with exact integer bytes")
    mea.set_defaults(func=cmd_measure)
    run = sub.add_parser("run", help="the sweep: a grid of cells into results.csv", epilog=RUN_HELP,
                         description="Run a grid of cells (model x batch size x device x mode x strategy), "
                                     "measured and predicted side by side, appending one row per cell to "
                                     "OUT/results.csv as it finishes.",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", type=Path, metavar="FILE.toml",
                     help="the sweep's TOML config (default: the embedded default sweep; see below)")
    run.add_argument("--out", type=Path, metavar="DIR", help="run folder (default: reports/NAME-YYYYmmdd-HHMMSS)")
    run.add_argument("--resume", action="store_true",
                     help="continue a stopped run: only cells without a row run (default folder: the latest)")
    run.add_argument("--overwrite", action="store_true", help="replace OUT/results.csv if it exists")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="worker processes; with N GPUs, one process per GPU (default: 1, in-process)")
    run.add_argument("--shard", type=_shard, metavar="K/N",
                     help="run only the K-th of N deterministic slices of the grid (whole series each), e.g. "
                          "one per Slurm array task; merge them with `bpmem report DIR... --out MERGED`")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--no-report", action="store_true", help="skip drawing plots and report.md at the end")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="draw plots and report.md from DIR/results.csv",
                         description="Re-draw DIR/plots/*.png|svg and DIR/report.md from DIR/results.csv "
                                     "(and DIR/timelines.csv); every number in the report comes from those files.")
    rep.add_argument("directory", type=Path, nargs="+", metavar="DIR",
                     help="a run folder written by `bpmem run`; several (the shards of one sweep) are merged")
    rep.add_argument("--out", type=Path, metavar="MERGED",
                     help="with several DIRs: the new folder for the merged results.csv, plots and report")
    rep.set_defaults(func=cmd_report)
    che = sub.add_parser("check", help="fail (exit 1) on a memory regression between two results.csv",
                         description="Join two results.csv files on (cell_id, rank), print a diff table in bytes "
                                     "and %, report improvements, and exit 1 when a rule is broken.",
                         epilog="rules: FIELD:N% or FIELD:BYTES, e.g. saved:0% peak:2% peak:1MiB; FIELD is "
                                "saved, peak, params, grads, optimizer, inference_peak, cuda_allocated, "
                                "cuda_reserved, or a *_bytes column. Default: saved:0% peak:0%.\n"
                                "exit status: 0 no regression; 1 a regression (a figure over its rule, a cell ok in "
                                "the baseline and not now, or with --strict a cell in one file only); 2 bad input (a "
                                "missing or malformed file, an unknown rule or field, a rule's column missing from a "
                                "file, nothing to compare); 3 an internal error.")
    che.add_argument("--baseline", type=Path, required=True, action="append", metavar="A.csv",
                     help="the reference results.csv, or a run folder; repeat for shards (merged)")
    che.add_argument("--results", type=Path, required=True, action="append", metavar="B.csv",
                     help="the new results.csv, or a run folder; repeat for shards (merged)")
    che.add_argument("--fail", action="append", metavar="FIELD:TOL", help="a regression rule (repeatable)")
    che.add_argument("--strict", action="store_true", help="cells in only one file fail instead of warning")
    che.add_argument("--all", action="store_true", help="print unchanged cells too")
    che.set_defaults(func=cmd_check)
    gra = sub.add_parser("graph", help="the computational graph as SVG, saved tensors with their bytes",
                         description="Draw the seed network's computational graph (with --bias, exercise 2's): "
                                     "forward edges, and each tensor autograd saves for backward, labelled "
                                     "with its bytes at --batch-size. Plain SVG; no Graphviz needed.")
    add_model_flags(gra)
    gra.add_argument("--out", type=Path, default=Path("graph.svg"), metavar="FILE.svg", help="output file")
    gra.set_defaults(func=cmd_graph)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.prog = f"bpmem {args.command}"
    if args.command == "measure" and not (args.device == "cpu" or args.device.startswith("cuda")):
        return _fail(args.prog, f"argument --device: {args.device!r} is not allowed; allowed: cpu, cuda, cuda:N")
    try:
        return args.func(args)
    except SpecError as error:
        return _fail(args.prog, f"argument --{error.field.replace('_', '-')}: {error.value!r} is not allowed; "
                                f"allowed: {error.allowed}")
    except InfeasibleBudget as error:
        return _fail_field(args.prog, error)
    except OSError as error:  # a folder that cannot be written, a disk that is full
        if error.filename is None:
            raise
        return _fail(args.prog, f"cannot write {error.filename}: {error.strerror}; allowed: a folder you can "
                                "write to (--out, DIR)")
    except KeyboardInterrupt:
        return 130


def run(argv: Sequence[str] | None = None) -> int:
    """The console entry (``bpmem``, ``python -m bpmem``): ``main``, but an unexpected
    exception is one line and exit status 3, never Python's 1, which ``bpmem check`` keeps
    for a regression. ``BPMEM_DEBUG=1`` shows the traceback."""
    import os

    try:
        return main(argv)
    except Exception as error:  # noqa: BLE001 - the last line of defence: a bug, said as one
        if os.environ.get("BPMEM_DEBUG"):
            raise
        text = str(error).strip().splitlines()
        print(f"bpmem: internal error: {type(error).__name__}: {text[0] if text else ''} (a bug in bpmem: please "
              "report it with the command line; BPMEM_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 3
