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
from typing import Any, NoReturn

from bpmem.spec import (
    ACTIVATIONS,
    DTYPES,
    LOSSES,
    MODES,
    OPTIMIZERS,
    STRATEGIES,
    MLPSpec,
    SpecError,
    StepSpec,
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


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: a number >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; allowed: a finite number >= 0")
    return value


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model and step flags of DESIGN §2; defaults are the seed's network."""
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
    g.add_argument("--strategy", choices=STRATEGIES, default=t.strategy, help="memory strategy")


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
    est = estimate(spec, step)
    if args.json:
        out = {**est.to_dict(), "config": _config(spec, step), "environment": environment("cpu")}
        out["terms"] = [asdict(t) for t in est.terms]
        print(json.dumps(out, indent=2))
        return 0
    _print_table(f"bpmem estimate: {_describe(spec, step)}", [
        *((t.name, t.bytes, t.formula) for t in est.terms),
        ("peak (training step)" if step.mode == "train" else "peak (inference)", est.peak_bytes,
         f"at {est.peak_op} in {est.peak_phase}"),
        ("inference peak", est.inference_peak_bytes, "forward under inference_mode"),
    ])
    if step.mode == "train":
        print(f"  training needs {est.training_to_inference_ratio:.2f}x the memory of inference")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    import torch

    from bpmem.environment import environment
    from bpmem.measure import measure

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
    result = measure(spec, step, device=device, rss=args.rss)
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


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bpmem", description=(
        "Where training memory goes, measured. bpmem predicts (estimate) and measures (measure) "
        "the bytes of one MLP step: parameters, gradients, optimizer state, the activations "
        "autograd saves for backward, and the peak."), formatter_class=argparse.RawDescriptionHelpFormatter)
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
    except KeyboardInterrupt:
        return 130
