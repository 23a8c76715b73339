"""The ``bpmem`` command line: the parser, the dispatch, and the exit status of every command.

- ``bpmem.cli.options``: option builders, argument types, one-line errors, tables;
- ``bpmem.cli.model_commands``: ``estimate`` and ``measure``;
- ``bpmem.cli.run_commands``: ``run``, ``report``, ``check``, ``graph``.

Every error is one line naming the flag and what it accepts, with exit status 2 and no
traceback; an unexpected one is exit status 3 (``run``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bpmem.cli.allocator_command import add_allocator_parser
from bpmem.cli.fit_command import add_fit_parser
from bpmem.cli.model_commands import cmd_estimate, cmd_measure
from bpmem.cli.options import FIGURES_HELP, RUN_HELP, Parser, add_model_flags, fail, fail_field, shard_type
from bpmem.cli.run_commands import cmd_check, cmd_graph, cmd_report, cmd_run
from bpmem.figures import ALIASES as FIGURE_ALIASES
from bpmem.models.user_model import UserCodeError, UserModelError, user_code_error
from bpmem.spec import InfeasibleBudget, SpecError
from bpmem.strategies import registry

__all__ = ["build_parser", "main", "run", "add_model_flags"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="bpmem", description=(
        "Where training memory goes, measured. bpmem predicts (estimate) and measures (measure) "
        "the bytes of one MLP step: parameters, gradients, optimizer state, the activations "
        "autograd saves for backward, and the peak."), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 success; 1 a memory regression (check); 2 bad input (a flag, config, file, "
               "budget, a step that does not fit, nothing to compare); 3 an internal error (a bug: one line, "
               "BPMEM_DEBUG=1 shows the traceback); 130 stopped by Ctrl-C.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('bpmem').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    est = sub.add_parser("estimate", help="predict every figure from autograd's rules, no memory",
                         description="Predict each figure without allocating: by arithmetic for the MLP, "
                                     "whose replay gives the plain step's peak exactly; where the arithmetic "
                                     "has only an upper estimate of the peak (checkpointing, selective, hvp), "
                                     "by a dry run of the step on fake tensors (no data, no memory), as for "
                                     "your own model and --amp.", epilog=FIGURES_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(est)
    est.add_argument("--json", action="store_true", help="print one JSON object with exact integer bytes")
    est.add_argument("--arithmetic", action="store_true",
                     help="the MLP's arithmetic alone, never importing torch: instant, but the peak of a "
                          "checkpointed, selective or hvp step is then an upper estimate")
    est.add_argument("--allocator", action="store_true",
                     help="for the MLP, also predict the CPU allocator's peak (predicted_allocator_peak_bytes: "
                          "the tensors as 64 B blocks plus each kernel's scratch, calibrated by real steps at "
                          "B=2, 4 and 8); your own model's estimate always gives it")
    est.add_argument("--device-kind", choices=("cpu", "cuda"), default="cpu",
                     help="cuda: also predict what a CUDA step allocates and reserves "
                          "(predicted_cuda_allocated_bytes, predicted_cuda_reserved_bytes: a dry run through a "
                          "model of PyTorch's caching allocator), on a machine without a GPU too")
    est.set_defaults(func=cmd_estimate)
    mea = sub.add_parser("measure", help="run real steps and read the figures off the probes",
                         description="Run a warm-up step, then one step per probe: SavedTensorProbe "
                                     "(saved activations), LiveTensorProbe (peak), CudaProbe on CUDA.",
                         epilog=FIGURES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(mea)
    mea.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    mea.add_argument("--rss", action="store_true", help="also sample the process RSS with psutil (coarse)")
    mea.add_argument("--trace", type=Path, metavar="FILE.pickle",
                     help="write the training step's memory trace, which PyTorch's viewer opens: python -m "
                          "torch.cuda._memory_viz trace_plot FILE.pickle -o FILE.html (on the CPU from the live "
                          "probe, with exact sizes; on CUDA the caching allocator's own history)")
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
                     help="worker processes; with N GPUs, one process per GPU; CPU jobs share torch's threads "
                          "(default: 1, in-process)")
    run.add_argument("--shard", type=shard_type, metavar="K/N",
                     help="run only the K-th of N deterministic slices of the grid (whole series each), e.g. "
                          "one per Slurm array task; merge them with `bpmem report DIR... --out MERGED`")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--trace", action="store_true",
                     help="write each measured training step's memory trace to OUT/traces/CELL_ID.pickle "
                          "(open with python -m torch.cuda._memory_viz trace_plot FILE -o FILE.html)")
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
    che = sub.add_parser("check", help="fail (exit 1) on a memory regression between two results.csv, or on "
                                       "measured figures off their predictions (--predicted)",
                         description="Join two results.csv files on (cell_id, rank), print a diff table in bytes "
                                     "and %, report improvements, and exit 1 when a rule is broken. With "
                                     "--predicted, compare each ok row's measured figures with the predictions "
                                     "in the same row instead (a table in IEC units; the CUDA allocator's peaks "
                                     "against predicted_peak_bytes, as a ratio).",
                         epilog="rules: FIELD:N% or FIELD:BYTES, e.g. saved:0% peak:2% peak:1MiB; FIELD is "
                                f"{', '.join(FIGURE_ALIASES)}, or a *_bytes column. Default: saved:0% peak:0%; "
                                "with --predicted, "
                                "saved:0%, and a rule bounds the difference either way (measured may be neither "
                                "more nor less than predicted by more than TOL).\n"
                                "exit status: 0 no regression; 1 a regression (a figure over its rule, a cell ok in "
                                "the baseline and not now, or with --strict a cell in one file only; with "
                                "--predicted, a figure off its prediction by more than its rule, or with --strict an "
                                "error row); 2 bad input (a missing or malformed file, an unknown rule or field, a "
                                "rule's column missing from a file, nothing to compare); 3 an internal error.")
    che.add_argument("--baseline", type=Path, action="append", metavar="A.csv",
                     help="the reference results.csv, or a run folder; repeat for shards (merged); needs --results")
    che.add_argument("--results", type=Path, action="append", metavar="B.csv",
                     help="the new results.csv, or a run folder; repeat for shards (merged); needs --baseline")
    che.add_argument("--predicted", type=Path, action="append", metavar="RUN",
                     help="instead of --baseline/--results: one results.csv or run folder (repeatable), each ok "
                          "row's measured figures against its own predicted_* columns; rows not ok are listed")
    che.add_argument("--fail", action="append", metavar="FIELD:TOL", help="a rule (repeatable)")
    che.add_argument("--strict", action="store_true",
                     help="cells in only one file fail instead of warning; with --predicted, error rows fail")
    che.add_argument("--all", action="store_true", help="print unchanged cells too (--predicted prints every line)")
    che.set_defaults(func=cmd_check)
    add_fit_parser(sub, add_model_flags)
    add_allocator_parser(sub)
    gra = sub.add_parser("graph", help="the computational graph as SVG, saved tensors with their bytes",
                         description="Draw the seed network's computational graph (with --bias, exercise 2's) for "
                                     "--mode and --strategy: forward edges, each tensor autograd keeps for backward "
                                     "labelled with its bytes at --batch-size, the tensors a checkpointed segment "
                                     "recomputes (segments shaded), and with --mode hvp the backward graph kept for "
                                     "the second derivative. Deep models fold into rows. Plain SVG; no Graphviz.")
    add_model_flags(gra)
    gra.add_argument("--out", type=Path, default=None, metavar="FILE.svg",
                     help="output file (default: reports/graphs/mlp-dDEPTH-hWIDTH-ACT-MODE-STRATEGY-BB.svg)")
    gra.set_defaults(func=cmd_graph)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.prog = f"bpmem {args.command}"
    if args.command == "measure" and not (args.device == "cpu" or args.device.startswith("cuda")):
        return fail(args.prog, f"argument --device: {args.device!r} is not allowed; allowed: cpu, cuda, cuda:N")
    # torch logs a fake kernel's failure with its traceback, which bpmem says in one line itself
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    if not os.environ.get("BPMEM_DEBUG"):
        quiet.addFilter(_no_records)
    try:
        return args.func(args)
    except UserModelError as error:
        if isinstance(error, UserCodeError):  # the factory or the data function raised
            if os.environ.get("BPMEM_DEBUG"):
                raise
            return fail(args.prog, f"argument {error}{YOUR_CODE if error.located else DEBUG}")
        return fail(args.prog, f"argument {error}")
    except SpecError as error:
        flag = f"--{error.field.replace('_', '-')}"
        takers = [name for name in registry.STRATEGIES if error.field in registry.parameters(name)]
        if error.allowed.startswith("not a parameter of") and takers:  # a strategy's flag given to another
            return fail(args.prog, f"argument {flag}: {error.allowed}; allowed: {flag} with --strategy "
                                    f"{', '.join(takers)}")
        return fail(args.prog, f"argument {flag}: {error.value!r} is not allowed; allowed: {error.allowed}")
    except InfeasibleBudget as error:
        return fail_field(args.prog, error)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - the user's model raised, or bpmem did (run says so)
        message = _user_code(args, error)
        if message is not None and not os.environ.get("BPMEM_DEBUG"):
            return fail(args.prog, message)
        if isinstance(error, OSError) and error.filename is not None and message is None:
            # a folder that cannot be written, a disk that is full
            return fail(args.prog, f"cannot write {error.filename}: {error.strerror}; allowed: a folder you can "
                                    "write to (--out, DIR)")
        raise
    finally:
        quiet.removeFilter(_no_records)


YOUR_CODE = " (raised by your code, not by bpmem; BPMEM_DEBUG=1 shows the traceback)"
DEBUG = " (BPMEM_DEBUG=1 shows the traceback)"


BATCH_NORM = "Expected more than 1 value per channel when training"


def _no_records(record: logging.LogRecord) -> bool:
    return False


def _user_code(args: argparse.Namespace, error: Exception) -> str | None:
    """The line for an exception the user's model (or torch's loss on its output) raised,
    None when bpmem raised it. With the MLP no code is the user's: everything is bpmem's."""
    if getattr(args, "model", "mlp") == "mlp":
        return None
    message = user_code_error(error, args.model, args.loss)
    if message is None:
        return None
    if BATCH_NORM in str(error):  # torch's words do not say why a batch had one row
        message += ("; BatchNorm cannot train on one row, and bpmem fit's search starts at batch 1: allowed: bpmem "
                    "estimate --batch-size B for each B >= 2" if args.command == "fit" else
                    "; BatchNorm cannot train on one row per batch: allowed: --batch-size >= 2 (with --strategy "
                    "microbatch, >= 2 rows per micro-batch: --batch-size / --microbatches), or --mode inference")
    return f"argument {message}{YOUR_CODE if message.startswith('--model') else DEBUG}"


def run(argv: Sequence[str] | None = None) -> int:
    """The console entry (``bpmem``, ``python -m bpmem``): ``main``, but an unexpected
    exception is one line and exit status 3, never Python's 1, which ``bpmem check`` keeps
    for a regression. ``BPMEM_DEBUG=1`` shows the traceback."""
    try:
        return main(argv)
    except BrokenPipeError:  # the reader left (`| head`): nothing more to say, and nothing to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as error:  # noqa: BLE001 - the last line of defence: a bug, said as one
        if os.environ.get("BPMEM_DEBUG"):
            raise
        text = str(error).strip().splitlines()
        print(f"bpmem: internal error: {type(error).__name__}: {text[0] if text else ''} (a bug in bpmem: please "
              "report it with the command line; BPMEM_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 3
