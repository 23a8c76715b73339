"""Option builders, argument types and the small helpers every command shares: one line
per error (exit 2), IEC tables, the config echoed back in --json."""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from dataclasses import asdict, fields
from typing import Any, NoReturn

from bpmem.figures import MEANINGS
from bpmem.spec import (
    ACTIVATIONS,
    AMP_DTYPES,
    BUDGET_ALLOWED,
    DTYPES,
    LOSSES,
    MODES,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    MLPSpec,
    SpecError,
    StepSpec,
    parse_budget,
)
from bpmem.strategies import registry
from bpmem.units import format_bytes

FIGURES_HELP = "figures (bytes; printed in IEC units, exact integers with --json):\n" + "".join(
    textwrap.fill(meaning, 96, initial_indent=f"  {name:<26}", subsequent_indent=" " * 28) + "\n"
    for name, meaning in MEANINGS.items()) + f"  {'per_layer':<26}saved bytes by module, plus loss and regularizer\n"


RUN_HELP = """\
config (TOML; every key optional, a list under [model] is a grid axis):
  name = "quick"                                   run folder prefix
  batch_sizes = [1, 16, 256]                       or { start = 1, stop = 4096, factor = 4 }
  devices = ["cpu"]                                cpu, cuda, cuda:N, or "auto" (every GPU)
  modes = ["train", "inference"]                   or "all"
  strategies = ["none"]                            or "all"
  repeats = 5                                      timed steps per cell (a strategy's: pairs with the plain step)
  timing_cap_s = 8                                 more pairs for at most this long, until the overhead is sure
  warmup = 1                                       untimed steps before them (more until the time settles)
  continue_after_oom = false                       still try larger batches after an OOM
  timeout_s = 300                                  a torchrun cell running longer is an error row
  threads = 4                                      torch's threads for every cell (default: torch's own)
  [model]  (or several [[model]])                  any model flag; optimizer, weight_decay, optimizer_impl, amp
  depth = [1, 8]

status per row: ok, oom (out of memory; larger batches of the series are then
skipped), error (message in the error column), skipped (with why: a cell this
machine cannot hold, e.g. "world_size 2 needs 2 GPUs ..., this machine has 1 GPU").
Where cells run: a cpu cell on the CPU (torchrun ranks over gloo), a cuda:K cell
of world size W on cuda:K .. cuda:K+W-1 (NCCL), whatever else the machine has.
Ctrl-C stops cleanly: finished rows stay, and --resume runs the rest.
"""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is a single line that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; allowed: an integer >= 1")
    return value


def budget_type(text: str) -> float | int:
    try:
        return parse_budget(text)
    except SpecError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a budget; allowed: {BUDGET_ALLOWED}") from None


def shard_type(text: str) -> Any:
    from bpmem.results.merge import Shard

    try:
        return Shard.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: a number >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; allowed: a finite number >= 0")
    return value


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model and step flags (docs/commands.md); defaults are the seed's network."""
    d, t = MLPSpec(), StepSpec()
    g = parser.add_argument_group("model (defaults: the seed's 784-256-10 network on MNIST-sized data)")
    g.add_argument("--input-dim", type=positive_int, default=d.input_dim, metavar="D", help="input features d")
    g.add_argument("--hidden-dim", type=positive_int, default=d.hidden_dim, metavar="H", help="hidden width h")
    g.add_argument("--output-dim", type=positive_int, default=d.output_dim, metavar="Q", help="outputs q")
    g.add_argument("--depth", type=positive_int, default=d.depth, help="hidden layers (1 = the seed)")
    g.add_argument("--bias", action=argparse.BooleanOptionalAction, default=d.bias,
                   help="bias on every Linear (the seed's exercise 2)")
    g.add_argument("--activation", choices=ACTIVATIONS, default=d.activation, help="phi")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype, help="parameter and activation dtype")
    g.add_argument("--loss", choices=(*LOSSES, "none"), default=d.loss,
                   help="l(o, y); none (with --model): the model's output is the scalar loss")
    g.add_argument("--l2", type=non_negative_float, default=d.l2, metavar="LAMBDA",
                   help="lambda of s = lambda/2 * sum ||W||_F^2; 0 builds no regulariser at all")
    g = parser.add_argument_group("your own model (instead of the MLP; docs/own-models.md)")
    g.add_argument("--model", default="mlp", metavar="MODULE:FACTORY",
                   help="FACTORY(**kwargs) returns an nn.Module, e.g. bpmem.models.gpt:make_gpt (default: mlp, "
                        "the seed's network, shaped by the flags above)")
    g.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments for FACTORY")
    g.add_argument("--data", metavar="MODULE:FUNC",
                   help="FUNC(batch_size, device) returns (inputs, target); inputs a tensor, a tuple "
                        "(positional) or a dict (keyword arguments)")
    g.add_argument("--input", action="append", metavar="SHAPE",
                   help="instead of --data: an input by shape, B the batch, e.g. 'float32[B,3,32,32]', or by "
                        "keyword: input_ids='int64[B,128]<32000' (repeat for several inputs)")
    g.add_argument("--target", metavar="SHAPE", help="the target by shape, e.g. 'int64[B]<10' (values 0..9)")
    g.add_argument("--blocks", metavar="PATH", help="the ModuleList of the model's ordered blocks, e.g. blocks "
                                                    "(default: the children of an nn.Sequential, else the "
                                                    "longest ModuleList of one class)")
    g = parser.add_argument_group("a Hugging Face model from its config (pip install 'bpmem[hf]'; "
                                  "docs/hugging-face.md)")
    g.add_argument("--hf", metavar="MODEL_TYPE", help="a transformers model type, built from its config with no "
                                                      "download or weights, e.g. llama, gpt2, bert, t5, vit")
    g.add_argument("--hf-config", metavar="JSON|PATH", help="config overrides as JSON, e.g. "
                                                            "'{\"num_hidden_layers\": 4}', or a local config.json")
    g.add_argument("--hf-head", metavar="HEAD", help="causal-lm, seq2seq-lm, masked-lm, sequence-classification or "
                                                     "image-classification (default: the model type's usual one)")
    g.add_argument("--seq-len", type=positive_int, metavar="N",
                   help="tokens per row of the synthetic batch (default: 128, or the config's maximum if less)")
    g = parser.add_argument_group("step")
    g.add_argument("--batch-size", type=positive_int, default=t.batch_size, metavar="B", help="rows per batch")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=t.optimizer, help="torch.optim choice")
    g.add_argument("--weight-decay", type=non_negative_float, default=t.weight_decay, metavar="X",
                   help="decay applied by the optimizer (SGD and Adam add X*W to the gradient, AdamW "
                        "shrinks W); independent of --l2, which adds a term to the loss")
    g.add_argument("--amp", choices=AMP_DTYPES, default=t.amp,
                   help="mixed precision: torch.autocast in this dtype around the forward and the loss, "
                        "float32 parameters; float16 adds a GradScaler (default: none)")
    g.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default=t.optimizer_impl,
                   help="torch.optim implementation: for-loop (one parameter at a time), foreach (one "
                        "kernel per op over all parameters), fused (one kernel); default: PyTorch's choice "
                        "for the device (for-loop on CPU, foreach on CUDA)")
    g.add_argument("--mode", choices=MODES, default=t.mode,
                   help="train: the full step; inference: one forward as served, in model.eval() under "
                   "torch.inference_mode() (Dropout off, BatchNorm on running statistics; the train-mode "
                   "forward is not offered); hvp: a Hessian-vector product")
    g.add_argument("--strategy", choices=registry.STRATEGIES, default=registry.PLAIN,
                   help="memory strategy: " + "; ".join(f"{name}: {cls.summary}"
                                                        for name, cls in registry.REGISTRY.items()))
    add_strategy_parameter_flags(g)


def add_strategy_parameter_flags(group: Any) -> None:
    """One flag per strategy parameter in the registry; a flag given to a strategy that does
    not take it is an error naming it (``registry.make_config``)."""
    for name in registry.parameters():
        users = [s for s in registry.STRATEGIES if name in registry.parameters(s)]
        meta = next(f.metadata for s in users for f in fields(registry.REGISTRY[s]) if f.name == name)
        default = next(f.default for f in fields(registry.REGISTRY[users[0]]) if f.name == name)
        kind = str if meta["choices"] else budget_type if not isinstance(default, int) else positive_int
        group.add_argument(f"--{name.replace('_', '-')}", type=kind, choices=meta["choices"], default=None,
                           metavar=meta["metavar"], help=f"{', '.join(users)}: {meta['help']}"
                           + (f" ({', '.join(meta['choices'])})" if meta["choices"] else ""))


def specs_from_args(args: argparse.Namespace) -> tuple[Any, StepSpec]:
    """The model (an ``MLPSpec``, or a ``UserModel`` with ``--model``) and the step."""
    values = vars(args)
    spec = user_model_from_args(args) or MLPSpec(**{f.name: values[f.name] for f in fields(MLPSpec)})
    given = {name: values[name] for name in registry.parameters() if values.get(name) is not None}
    step = registry.make_step(values["strategy"], **given,
                              **{f.name: values[f.name] for f in fields(StepSpec) if f.name in values
                                 and f.name != "strategy"})
    return spec, step


def user_model_from_args(args: argparse.Namespace) -> Any:
    """The ``UserModel`` the --model flags name, or None for the MLP; ``UserModelError`` names a flag."""
    from bpmem.models.user_model import TensorShape, UserModel, UserModelError

    values = vars(args)
    for flag in ("hf_config", "hf_head", "seq_len"):
        if values.get(flag) and not values.get("hf"):
            raise SpecError(flag, values[flag], "only with --hf MODEL_TYPE")
    if values.get("model", "mlp") == "mlp" and not values.get("hf"):
        for flag in ("data", "input", "target", "blocks"):
            if values.get(flag):
                raise SpecError(flag, values[flag], "only with --model MODULE:FACTORY")
        return None
    mlp = MLPSpec()
    builder = f"--hf {values['hf']}" if values.get("hf") else values["model"]
    for name in MLP_ONLY:  # the MLP's flags mean nothing to the user's factory: never ignore them silently
        if values.get(name, getattr(mlp, name)) != getattr(mlp, name):
            flag = ("--bias" if values[name] else "--no-bias") if name == "bias" else f"--{name.replace('_', '-')}"
            what, allowed = (("adds the MLP's regulariser only", "--weight-decay, or the term in your model's own "
                              "loss (--loss none)") if name == "l2" else
                             ("shapes the MLP only", "the factory's keyword arguments, in --model-kwargs"))
            raise UserModelError(flag, f"{what}, and {builder} builds its own model; allowed with --model: "
                                       f"{allowed}")
    if values.get("hf"):
        return _hf_model(values)
    return UserModel(values["model"], values["model_kwargs"], values.get("data"),
                     tuple(TensorShape.parse(text, "--input") for text in values.get("input") or ()),
                     TensorShape.parse(values["target"], "--target") if values.get("target") else None,
                     values["loss"], values.get("blocks"))


def _hf_model(values: dict[str, Any]) -> Any:
    """``--hf``: none of the other model flags, which it sets itself."""
    from bpmem.models.hf import hf_model
    from bpmem.models.user_model import UserModelError

    clash = next((flag for flag in ("data", "input", "target") if values.get(flag)), None)
    if values.get("model", "mlp") != "mlp" or clash:
        flag = f"--{clash}" if clash else "--model"
        raise UserModelError(flag, "--hf builds the model and its batch from the config; allowed: --hf with "
                                   "--hf-config, --hf-head, --seq-len and --blocks, or --model without --hf")
    return hf_model(values["hf"], values.get("hf_config"), values.get("hf_head"), values.get("seq_len"),
                    values.get("blocks"))


# the MLP's shape flags (not --loss, which a user model has too): refused with --model
MLP_ONLY: tuple[str, ...] = ("input_dim", "hidden_dim", "output_dim", "depth", "bias", "activation", "dtype", "l2")


def echo_config(spec: MLPSpec, step: StepSpec, device: str | None = None) -> dict[str, Any]:
    model = asdict(spec) if isinstance(spec, MLPSpec) else {"model": spec.factory, "model_kwargs": spec.kwargs_json,
                                                             "data": spec.data, "loss": spec.loss,
                                                             "blocks": spec.blocks_path}
    config = {**model, **registry.flat_step(step)}
    if device is not None:
        config["device"] = device
    return config


def print_table(title: str, rows: list[tuple[str, int, str]]) -> None:
    print(title)
    width = max(len(name) for name, _, _ in rows)
    for name, nbytes, note in rows:
        print(f"  {name:<{width}}  {format_bytes(nbytes):>11}  {nbytes:>15,} B  {note}")


def describe(spec: Any, step: StepSpec) -> str:
    if not isinstance(spec, MLPSpec):
        return f"{spec.name}, {spec.loss} loss, B={step.batch_size}, {step.optimizer}, {step.mode}"
    dims = "-".join(str(n) for n in [spec.input_dim] + [spec.hidden_dim] * spec.depth + [spec.output_dim])
    return (f"{dims}, {'bias' if spec.bias else 'no bias'}, {spec.activation}, {spec.loss}, {spec.dtype}, "
            f"B={step.batch_size}, {step.optimizer}, {step.mode}")


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


# the fields a bpmem check's ValueError may name ("field: why; allowed: ..."): the specs', the
# strategies' parameters, and the flags a strategy's check of a model names
_FLAG_FIELDS = frozenset({*(f.name for f in (*fields(MLPSpec), *fields(StepSpec))), *registry.parameters(),
                          "model", "device", "world_size", "data", "blocks"})


def field_message(error: ValueError) -> str | None:
    """A bpmem check's "field: why; allowed: ..." as an error on that field's flag; None for
    any other ValueError (PyTorch's, the user's), whose text names no flag and must not be
    cut at its first ": " as if it did."""
    from bpmem.models.user_model import raised_by_bpmem

    field, sep, rest = str(error).partition(": ")
    if not sep or field not in _FLAG_FIELDS or not raised_by_bpmem(error):
        return None
    return f"argument --{field.replace('_', '-')}: {rest}"


def fail_field(prog: str, error: ValueError) -> int:
    """``field_message``'s line, exit 2; only for an error known to be bpmem's field error."""
    message = field_message(error)
    return fail(prog, message if message is not None else str(error))


def print_json(document: dict[str, Any]) -> None:
    """Strict JSON on stdout: a figure that is not a finite number (the loss of an estimate,
    NaN; a ratio with nothing to divide) is null, never Python's NaN or Infinity, which
    JSON has not got and strict parsers refuse."""
    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    print(json.dumps(finite(document), indent=2, allow_nan=False))


def trace_refusal(args: argparse.Namespace, step: StepSpec) -> str:
    """Why ``--trace`` cannot apply to this step ("" when it can): only a training step of a
    single-device strategy the probes can watch has one."""
    if getattr(args, "trace", None) is None:
        return ""
    if step.mode != "train" or step.strategy.placement != "one-device":
        return (f"argument --trace: no trace of --mode {step.mode} with --strategy {step.strategy.name}; allowed: "
                "--mode train with a single-device strategy")
    return ""


def write_trace(args: argparse.Namespace, snapshot: dict[str, Any] | None) -> None:
    """Write ``--trace``'s file (if asked for) and say how to open it, on stderr."""
    if getattr(args, "trace", None) is None or not snapshot:
        return
    from bpmem.measurement.memory_trace import write_snapshot

    path = write_snapshot(args.trace, snapshot)
    print(f"{args.prog}: wrote {path}; open it with: python -m torch.cuda._memory_viz trace_plot {path} "
          f"-o {path.with_suffix('.html')}", file=sys.stderr)
