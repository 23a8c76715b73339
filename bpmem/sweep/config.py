"""Sweep configs: a TOML grid over model flags, batch sizes, devices, modes and strategies.

A config file looks like this (every key optional; a list in ``[model]`` is a grid axis, and
several ``[[model]]`` tables are several grids, one after another)::

    name = "quick"
    batch_sizes = [1, 16, 256]          # or { start = 1, stop = 4096, factor = 4 }
    devices = ["cpu"]                   # cpu, cuda, cuda:N, or "auto" (every visible GPU)
    modes = ["train", "inference"]
    strategies = ["none"]
    repeats = 5                         # timed steps per cell (a strategy's: pairs with the plain step), at least
    warmup = 1                          # untimed steps first
    timing_cap_s = 8                    # more pairs, until the overhead's interval is narrow, for at most this long
    continue_after_oom = false          # after an OOM, still try larger batches of the series

    [model]
    depth = [1, 8]
    hidden_dim = 256
    optimizer = "sgd"

Validation happens before any output exists: an error names the key and its allowed values.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpmem.measurement.timing_pairs import MAX_TIMED_SECONDS
from bpmem.models.user_model import UserModelError
from bpmem.spec import MODES, MLPSpec, SpecError, StepSpec
from bpmem.strategies import registry
from bpmem.strategies.base import ONE_DEVICE
from bpmem.strategies.checkpoint_selective import POLICIES
from bpmem.strategies.placement import Machine, devices_here, expand_devices
from bpmem.strategies.registry import STRATEGIES, make_step
from bpmem.sweep.model_table import user_model, user_model_value

Grid = tuple[tuple[str, tuple[Any, ...]], ...]  # a [model] table: (key, values) pairs, a grid
MLP_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MLPSpec))
# your own model instead of the MLP: [model] factory = "pkg.mod:make", data = "pkg.mod:batch", kwargs = {...}
USER_MODEL_KEYS: tuple[str, ...] = ("factory", "data", "kwargs", "input", "target", "blocks")
# a Hugging Face model from its config: [model] hf = "llama", hf_config = {...}, seq_len = [512, 2048]
HF_KEYS: tuple[str, ...] = ("hf", "hf_config", "hf_head", "seq_len")
STEP_KEYS: tuple[str, ...] = ("optimizer", "weight_decay", "optimizer_impl", "amp")  # how the step is run
MODEL_KEYS: tuple[str, ...] = MLP_KEYS + STEP_KEYS + USER_MODEL_KEYS + HF_KEYS
TOP_KEYS: tuple[str, ...] = ("name", "description", "batch_sizes", "devices", "modes", "strategies", "repeats",
                             "warmup", "timing_cap_s", "continue_after_oom", "timeout_s", "threads", "model")

# bpmem's default sweep (what `bpmem run` runs without --config), shipped beside this module
DEFAULT_CONFIG_TOML = (Path(__file__).parent / "default_sweep.toml").read_text()


class ConfigError(ValueError):
    """A config key holds something it may not; ``key`` is dotted (``model.depth``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class Cell:
    """One measurement: a model, how it is stepped, and where."""

    spec: MLPSpec
    step: StepSpec
    device: str

    @property
    def series(self) -> tuple[Any, ...]:
        """Cells that differ only in batch size form a series (OOM skips the larger ones)."""
        return (self.spec, dataclasses.replace(self.step, batch_size=1), self.device)

    @property
    def cell_id(self) -> str:
        s, t = self.spec, self.step
        # weight decay and the implementation are named only where set, so ids of earlier runs hold
        optimizer = (t.optimizer + (f"-wd={t.weight_decay:g}" if t.weight_decay else "")
                     + (f"-{t.optimizer_impl}" if t.optimizer_impl != "default" else "")
                     + (f"-amp={t.amp}" if t.amp != "none" else ""))
        if not isinstance(s, MLPSpec):  # your own model: its factory and arguments name it
            kwargs = "".join(f"-{k}={v}" for k, v in sorted(json.loads(s.kwargs_json).items()))
            named = s.factory
            if s.name.startswith("hf:"):  # hf:llama-its overrides-its head; the sequence length is in the batch
                built = json.loads(s.kwargs_json)
                kwargs = "".join(f"-{k}={v}" for k, v in sorted(built["config"].items())) + f"-{built['head']}"
                kwargs += f"-seq_len={s.inputs[0].dims[1]}" if len(s.inputs[0].dims) == 2 else ""
                named = s.name
            return (f"{named}{kwargs}-{s.loss}-{optimizer}-B{t.batch_size}-{t.mode}-{t.strategy.name}"
                    f"{''.join(f'-{k}={v}' for k, v in sorted(t.strategy_params().items()))}-{self.device}")
        return (f"d{s.input_dim}-h{s.hidden_dim}-q{s.output_dim}-L{s.depth}-{'bias' if s.bias else 'nobias'}-"
                f"{s.activation}-{s.loss}-{s.dtype}-l2={s.l2:g}-{optimizer}-B{t.batch_size}-{t.mode}-"
                f"{t.strategy.name}{''.join(f'-{k}={v}' for k, v in sorted(t.strategy_params().items()))}-"
                f"{self.device}")


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep. Each grid of ``model`` holds (field, values) pairs; every combination
    is a model."""

    name: str = "sweep"
    description: str = ""
    model: tuple[Grid, ...] = ((),)  # one grid per [[model]] table; the empty grid: the default MLP
    batch_sizes: tuple[int, ...] = (64,)
    devices: tuple[str, ...] = ("cpu",)
    modes: tuple[str, ...] = ("train",)
    strategies: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = (("none", ()),)
    repeats: int = 3
    warmup: int = 1
    # seconds of timed steps a strategy's cell may spend on pairs beyond ``repeats``, to narrow
    # its overhead's interval (bpmem.measurement.timing_pairs); 0 times exactly ``repeats`` pairs
    timing_cap_s: float = MAX_TIMED_SECONDS
    continue_after_oom: bool = False
    timeout_s: int = 300  # a distributed cell (torchrun) that runs longer is killed: status error
    threads: int | None = None  # torch's intra-op threads for every cell (None: torch's default), recorded per row

    def cells(self, devices: tuple[str, ...] | None = None) -> list[Cell]:
        """Every cell, each series in ascending batch size; ``devices`` as resolved."""
        cells = []
        combos = [dict(zip([k for k, _ in grid], combo, strict=True))
                  for grid in self.model for combo in itertools.product(*(values for _, values in grid))]
        for fields in combos:
            stepping = {key: fields.pop(key) for key in STEP_KEYS if key in fields}
            spec = user_model(fields) if "factory" in fields or "hf" in fields else MLPSpec(**fields)
            for device, (strategy, params), mode in itertools.product(devices or self.devices, self.strategies,
                                                                      self.modes):
                if mode != "train" and strategy != registry.PLAIN:
                    continue  # strategies change what backward keeps: inference has none
                for batch in sorted(self.batch_sizes):
                    step = make_step(strategy, batch_size=batch, mode=mode, **stepping, **dict(params))
                    cells.append(Cell(spec, step, device))
        return cells

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        grids = [{k: list(v) for k, v in grid} for grid in self.model]
        out["model"] = grids[0] if len(grids) == 1 else grids
        out["strategies"] = [{"name": name, **dict(params)} for name, params in self.strategies]
        return out


def _as_list(key: str, value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _batch_sizes(value: Any) -> tuple[int, ...]:
    if isinstance(value, dict):
        unknown = set(value) - {"start", "stop", "factor"}
        if unknown:
            raise ConfigError("batch_sizes", f"unknown key {sorted(unknown)[0]!r}; allowed: start, stop, factor")
        start, stop, factor = value.get("start", 1), value.get("stop"), value.get("factor", 2)
        for name, number in (("start", start), ("stop", stop), ("factor", factor)):
            if isinstance(number, bool) or not isinstance(number, int) or number < (2 if name == "factor" else 1):
                allowed = "an integer >= 2" if name == "factor" else "an integer >= 1"
                raise ConfigError(f"batch_sizes.{name}", f"{number!r} is not allowed; allowed: {allowed}")
        sizes, size = [], start
        while size <= stop:
            sizes.append(size)
            size *= factor
        value = sizes
    values = _as_list("batch_sizes", value)
    for size in values:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError("batch_sizes", f"{size!r} is not allowed; allowed: integers >= 1")
    if not values:
        raise ConfigError("batch_sizes", "is empty; allowed: integers >= 1")
    return tuple(dict.fromkeys(values))


def _choices(key: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if value == "all":
        return allowed
    values = _as_list(key, value)
    for item in values:
        if item not in allowed:
            raise ConfigError(key, f"{item!r} is not allowed; allowed: {', '.join(allowed)} (or \"all\")")
    if not values:
        raise ConfigError(key, f"is empty; allowed: {', '.join(allowed)}")
    return tuple(dict.fromkeys(values))


STRATEGY_KEYS: tuple[str, ...] = ("name", *registry.parameters())
# "all": every single-device strategy once, with its default parameters, and selective with both policies
ALL_STRATEGIES: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = tuple(
    (name, ()) for name in registry.names(ONE_DEVICE) if "policy" not in registry.parameters(name)
) + tuple((name, (("policy", policy),)) for name in registry.names(ONE_DEVICE)
          if "policy" in registry.parameters(name) for policy in POLICIES)


def _strategies(value: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """Names, or tables ``{name = "checkpoint-budget", budget = [0.3, 0.5]}`` (lists expand)."""
    if value == "all":
        return ALL_STRATEGIES
    variants: list[tuple[str, tuple[tuple[str, Any], ...]]] = []
    for item in _as_list("strategies", value):
        table = item if isinstance(item, dict) else {"name": item}
        for key in table:
            if key not in STRATEGY_KEYS:
                raise ConfigError(f"strategies.{key}", f"unknown key; allowed: {', '.join(STRATEGY_KEYS)}")
        name = table.get("name")
        if name not in STRATEGIES:
            raise ConfigError("strategies", f"{name!r} is not allowed; allowed: {', '.join(STRATEGIES)} (or \"all\")")
        keys = [k for k in STRATEGY_KEYS[1:] if k in table]
        for combo in itertools.product(*(_as_list(k, table[k]) for k in keys)):
            try:
                config = registry.make_config(name, **dict(zip(keys, combo, strict=True)))
                params = tuple(config.params().items())
            except SpecError as error:
                raise ConfigError(f"strategies.{error.field}", f"{error.value!r} is not allowed; "
                                                               f"allowed: {error.allowed}") from None
            variants.append((name, params))
    if not variants:
        raise ConfigError("strategies", f"is empty; allowed: {', '.join(STRATEGIES)}")
    return tuple(dict.fromkeys(variants))


def _devices(value: Any) -> tuple[str, ...]:
    values = _as_list("devices", value)
    for device in values:
        ok = device in ("cpu", "cuda", "auto") or (
            isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit())
        if not ok:
            raise ConfigError("devices", f"{device!r} is not allowed; allowed: cpu, cuda, cuda:N, auto")
    if not values:
        raise ConfigError("devices", "is empty; allowed: cpu, cuda, cuda:N, auto")
    return tuple(dict.fromkeys(values))


def _models(tables: Any) -> tuple[Grid, ...]:
    """``[model]`` (one grid) or ``[[model]]`` (several, e.g. two models of your own, each
    with its own factory and data): each grid's cells come after the previous grid's."""
    if isinstance(tables, list) and tables:
        return tuple(_model(table) for table in tables)
    return (_model(tables),)


def _model(table: Any) -> Grid:
    if not isinstance(table, dict):
        raise ConfigError("model", "must be a table ([model]) or an array of tables ([[model]])")
    pairs = []
    for key, value in table.items():
        if key not in MODEL_KEYS:
            raise ConfigError(f"model.{key}", f"unknown key; allowed: {', '.join(MODEL_KEYS)}")
        values = _as_list(key, value)
        if not values:
            raise ConfigError(f"model.{key}", "is empty")
        user = "factory" in table or "hf" in table
        if user and key in MLP_KEYS and key != "loss":
            raise ConfigError(f"model.{key}", "shapes the MLP only; allowed with factory: "
                                              f"{', '.join(('optimizer', 'loss', *USER_MODEL_KEYS))}")
        if not user and key in USER_MODEL_KEYS:
            raise ConfigError(f"model.{key}", "goes with factory = \"MODULE:FACTORY\" (your own model)")
        if key in HF_KEYS[1:] and "hf" not in table:
            raise ConfigError(f"model.{key}", "goes with hf = \"MODEL_TYPE\" (a Hugging Face model)")
        if "hf" in table and key in ("factory", "data", "input", "target", "kwargs", "loss"):
            raise ConfigError(f"model.{key}", "hf builds the model and its batch from the config; allowed with hf: "
                                              f"{', '.join((*STEP_KEYS, *HF_KEYS, 'blocks'))}")
        checked = []
        for item in values:  # check each value on its own, so the message names it
            try:
                if key in STEP_KEYS:
                    StepSpec(**{key: item})
                elif user and key in (*USER_MODEL_KEYS, *HF_KEYS, "loss"):
                    item = user_model_value(key, item)
                else:
                    MLPSpec(**{key: item})
            except SpecError as error:
                raise ConfigError(f"model.{key}", f"{item!r} is not allowed; allowed: {error.allowed}") from None
            except UserModelError as error:  # a user-model key's value (sweep/model_table.py), named by its key
                raise ConfigError(error.flag, str(error).split(": ", 1)[1]) from None
            checked.append(item)
        pairs.append((key, tuple(dict.fromkeys(checked))))  # depth = [1, 1] is one model, not two
    return tuple(pairs)


def _count(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, f"{value!r} is not allowed; allowed: an integer >= {minimum}")
    return value


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise ConfigError(key, f"{value!r} is not allowed; allowed: a number of seconds >= 0")
    return float(value)


def parse_config(data: dict[str, Any], default_name: str = "sweep") -> SweepConfig:
    """Validate a parsed TOML document into a SweepConfig."""
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(key, f"unknown key; allowed: {', '.join(TOP_KEYS)}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise ConfigError("name", f"{name!r} is not allowed; allowed: a word without spaces or slashes")
    flag = data.get("continue_after_oom", False)
    if not isinstance(flag, bool):
        raise ConfigError("continue_after_oom", f"{flag!r} is not allowed; allowed: true, false")
    config = SweepConfig(
        name=name,
        description=str(data.get("description", "")),
        model=_models(data.get("model", {})),
        batch_sizes=_batch_sizes(data.get("batch_sizes", [64])),
        devices=_devices(data.get("devices", ["cpu"])),
        modes=_choices("modes", data.get("modes", ["train"]), MODES),
        strategies=_strategies(data.get("strategies", ["none"])),
        repeats=_count("repeats", data.get("repeats", 3), 1),
        warmup=_count("warmup", data.get("warmup", 1), 0),
        timing_cap_s=_seconds("timing_cap_s", data.get("timing_cap_s", MAX_TIMED_SECONDS)),
        continue_after_oom=flag,
        timeout_s=_count("timeout_s", data.get("timeout_s", 300), 1),
        threads=_count("threads", data["threads"], 1) if "threads" in data else None,
    )
    from bpmem.models.user_model import UserModelError

    try:
        cells = config.cells()
    except UserModelError as error:  # a combination of keys that cannot be a model
        raise ConfigError(error.flag.replace("--", "model."), str(error).split(": ", 1)[1]) from None
    # your own model under a split strategy: refused here, before any output, where the strategy
    # cannot split it at any batch (tensor-parallel; a pipeline of a model that is no nn.Sequential)
    for spec, strategy in dict.fromkeys((c.spec, c.step.strategy) for c in cells
                                        if c.step.world_size > 1 and not isinstance(c.spec, MLPSpec)):
        try:
            strategy.check_model(spec)
        except UserModelError as error:
            raise ConfigError(error.flag.replace("--", "model."), str(error).split(": ", 1)[1]) from None
        except ValueError as error:
            raise ConfigError("strategies", str(error).split(": ", 1)[1].replace("--model", "factory")) from None
    if not cells:
        raise ConfigError("strategies", f"with modes {list(config.modes)} the grid has no cell: strategies other "
                                        "than none run in train mode only; allowed: add \"train\" to modes, or "
                                        "\"none\" to strategies")
    return config


def load_config(path: str | Path | None) -> SweepConfig:
    """Read a TOML file (or the embedded default sweep when ``path`` is None)."""
    if path is None:
        return parse_config(tomllib.loads(DEFAULT_CONFIG_TOML), "default")
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError("--config", f"cannot read {str(path)!r}: {error.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("--config", f"{path} is not valid TOML: {error}") from None
    return parse_config(data, path.stem)


def resolve_devices(devices: tuple[str, ...], machine: Machine | None = None) -> tuple[str, ...]:
    """Check each device exists on ``machine`` (this one by default); expand ``auto`` to
    every visible GPU and ``cuda`` to ``cuda:0`` (``bpmem.strategies.placement``)."""
    if devices == ("cpu",):
        return devices
    machine = machine or Machine.here()
    resolved, missing = expand_devices(devices, machine)
    if missing:
        field_name, _, why = missing.partition(": ")
        raise ConfigError(field_name, f"{why}; allowed here: {devices_here(machine)}")
    return resolved
