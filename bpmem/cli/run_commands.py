"""``bpmem run``, ``report``, ``check`` and ``graph``: sweeps, their folders, and what is made from them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bpmem.cli.options import fail, specs_from_args

if TYPE_CHECKING:
    from bpmem.results.check import Rule


def _latest_run(root: Path, name: str) -> Path | None:
    runs = sorted((p for p in root.glob(f"{name}-*") if (p / "run.json").exists()), key=lambda p: p.name)
    return runs[-1] if runs else None


def cmd_run(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from bpmem.sweep.config import ConfigError, load_config, resolve_devices
    from bpmem.sweep.run import run_sweep

    try:
        config = load_config(args.config)
        devices = resolve_devices(config.devices)
    except ConfigError as error:
        source = args.config if args.config and not str(error).startswith("--config") else None
        return fail(args.prog, f"{source}: {error}" if source else f"{error}")
    if args.jobs < 1:
        return fail(args.prog, f"argument --jobs: {args.jobs} is not allowed; allowed: an integer >= 1")
    if args.resume and args.overwrite:
        return fail(args.prog, "argument --overwrite: not allowed with --resume (one continues a run, the other "
                                "replaces it); allowed: one of them")
    now = datetime.now(UTC)
    if args.resume:
        out = args.out or _latest_run(Path("reports"), config.name)
        if out is None or not (out / "run.json").exists():
            where = str(args.out) if args.out else f"reports/{config.name}-*"
            return fail(args.prog, f"argument --resume: no earlier run of {config.name!r} in {where}; allowed: "
                                    "--out DIR of a run this --config started")
        run_info = json.loads((out / "run.json").read_text())
        if run_info.get("config") != json.loads(json.dumps(config.to_dict())):
            return fail(args.prog, f"argument --resume: {out} was made by another config; pass the same --config")
        if run_info.get("shard") != (str(args.shard) if args.shard else None):
            was = run_info.get("shard") or "none (the whole grid)"
            return fail(args.prog, f"argument --shard: {out} is shard {was}; allowed: the same --shard as the run "
                                    "being resumed")
    else:
        shard_name = f"-shard{args.shard.index}of{args.shard.count}" if args.shard else ""
        default = Path("reports") / f"{config.name}-{now:%Y%m%d-%H%M%S}{shard_name}"
        try:
            out = _new_run_folder(args.out, default, args.overwrite)
        except FileExistsError:
            return fail(args.prog, f"argument --out: {args.out} already holds results.csv; allowed: --resume to "
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
    outcome = run_sweep(config, devices, out, run_info["run_id"], jobs=args.jobs, quiet=args.quiet, shard=args.shard,
                        trace=args.trace)
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
    from bpmem.report.build import report

    path = report(directory)
    if not quiet:
        print(f"bpmem report: {path} and {directory / 'plots'}/", file=sys.stderr)
    return path


def cmd_report(args: argparse.Namespace) -> int:
    from bpmem.results.merge import merge_runs
    from bpmem.results.table import ResultsFileError

    for folder in args.directory:
        if not (folder / "results.csv").exists():
            return fail(args.prog, f"argument DIR: {folder} has no results.csv; allowed: a folder that "
                                    "`bpmem run` wrote")
    if len(args.directory) > 1 and args.out is None:
        return fail(args.prog, "argument --out: several run folders are merged into one; allowed: --out MERGED, "
                                "a new folder for the merged results.csv and report")
    if len(args.directory) == 1 and args.out is not None:  # never a report drawn elsewhere than asked
        return fail(args.prog, f"argument --out: only with several DIRs, merged into MERGED; one DIR's report is "
                                f"drawn in {args.directory[0]} itself; allowed: bpmem report DIR, or bpmem report "
                                "DIR DIR... --out MERGED")
    directory = args.out if len(args.directory) > 1 else args.directory[0]
    try:
        if len(args.directory) > 1:
            merge_runs(args.directory, directory)
        path = _report(directory, quiet=True)
    except ResultsFileError as error:
        return fail(args.prog, f"argument DIR: {error}")
    print(f"bpmem report: wrote {path} and {directory / 'plots'}/")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from bpmem.results.check import CheckInputError, RuleError, compare, parse_rule, render
    from bpmem.results.merge import results_path

    if args.predicted and (args.baseline or args.results):
        return fail(args.prog, "argument --predicted: not allowed with --baseline/--results (one checks a run "
                                "against its predictions, the other two runs against each other); allowed: "
                                "--predicted RUN, or --baseline A.csv --results B.csv")
    if not args.predicted and not (args.baseline and args.results):
        flag = "--results" if args.baseline else "--baseline"
        return fail(args.prog, f"argument {flag}: required; allowed: --baseline A.csv --results B.csv (a results.csv "
                                "or run folder each), or --predicted RUN")
    default = ["saved:0%"] if args.predicted else ["saved:0%", "peak:0%"]
    try:
        rules = [parse_rule(text) for text in (args.fail or default)]
    except RuleError as error:
        return fail(args.prog, f"argument --fail: {error}")
    places = (("--predicted", args.predicted),) if args.predicted else (("--baseline", args.baseline),
                                                                          ("--results", args.results))
    for flag, paths in places:
        for path in paths:
            if not results_path(path).is_file():
                return fail(args.prog, f"argument {flag}: {path} is not a results.csv or a run folder with one; "
                                        "allowed: a results.csv, or a folder that `bpmem run` wrote")
    if args.predicted:
        return _check_predicted(args, rules)
    try:
        comparison = compare(args.baseline, args.results, rules, strict=args.strict)
    except CheckInputError as error:
        return fail(args.prog, str(error))
    print(render(comparison, show_all=args.all))
    return 1 if comparison.failed else 0


def _check_predicted(args: argparse.Namespace, rules: list[Rule]) -> int:
    """``bpmem check --predicted``: 1 when a figure is off its prediction by more than its rule."""
    from bpmem.results.check import CheckInputError
    from bpmem.results.predicted_check import compare_predicted, render_predicted

    try:
        comparison = compare_predicted(args.predicted, rules, strict=args.strict)
    except CheckInputError as error:
        return fail(args.prog, f"argument --predicted: {error}")
    print(render_predicted(comparison))
    return 1 if comparison.failed else 0


def cmd_graph(args: argparse.Namespace) -> int:
    from bpmem.report.graph import write_graph
    from bpmem.spec import StepSpec
    from bpmem.strategies import registry
    from bpmem.strategies.base import ONE_DEVICE

    if args.model != "mlp":
        return fail(args.prog, f"argument --model: bpmem graph draws only the MLP (the seed's network, shaped by "
                                f"--depth, --hidden-dim and the other model flags), not {args.model}; allowed: "
                                "--model mlp (the default)")
    unused = [name for name in ("optimizer", "optimizer_impl", "weight_decay")
              if getattr(args, name) != getattr(StepSpec(), name)]
    if unused:  # never ignored in silence: the drawing would be the same
        flag = f"--{unused[0].replace('_', '-')}"
        return fail(args.prog, f"argument {flag}: bpmem graph draws the forward and backward graph, in which the "
                                f"optimizer has no part; allowed: leave {flag} out (bpmem estimate counts the "
                                "optimizer's state)")
    spec, step = specs_from_args(args)
    drawn = [name for name in registry.names(ONE_DEVICE) if not registry.REGISTRY[name].compiles]
    if step.strategy.name not in drawn:
        why = ("compiles the step, whose graph the compiler rewrites" if step.strategy.compiles
               else f"splits the step over {step.world_size} ranks")
        return fail(args.prog, f"argument --strategy: bpmem graph draws one device's eager autograd graph, and "
                                f"{step.strategy.name} {why}; allowed: {', '.join(drawn)}")
    if step.amp != "none":
        return fail(args.prog, f"argument --amp: bpmem graph draws the full-precision step, not {step.amp} "
                                "autocast's; allowed: none")
    path = write_graph(spec, step, args.out)
    print(f"bpmem graph: wrote {path}")
    return 0
