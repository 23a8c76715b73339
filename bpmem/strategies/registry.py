"""Every memory strategy bpmem knows, by name. Adding one is one module and one line below.

The CLI's ``--strategy`` choices and parameter flags, the sweep config's ``strategies``
tables, results.csv's ``strategy_params``, the report's labels and every prediction come
from here: ``make_config`` turns a name and flat parameters (``segments=2``) into the
strategy's typed config, which a ``StepSpec`` carries.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bpmem.spec import SpecError, StepSpec
from bpmem.strategies.base import DEVICES, ONE_DEVICE, RANKS, NoStrategy, SplitConfig, StrategyConfig
from bpmem.strategies.checkpoint_budget import CheckpointBudget
from bpmem.strategies.checkpoint_every_k import CheckpointEveryK
from bpmem.strategies.checkpoint_layer import CheckpointLayer
from bpmem.strategies.checkpoint_segments import CheckpointSegments
from bpmem.strategies.checkpoint_selective import POLICIES, CheckpointSelective
from bpmem.strategies.checkpoint_sqrt import CheckpointSqrt
from bpmem.strategies.compile_budget import CompileBudget
from bpmem.strategies.ddp import DDP
from bpmem.strategies.fsdp import FSDP
from bpmem.strategies.microbatch import Microbatch
from bpmem.strategies.model_parallel import ModelParallel
from bpmem.strategies.pipeline import Pipeline1F1B, PipelineGPipe, PipelineInterleaved
from bpmem.strategies.tensor_parallel import TensorParallel

__all__ = ["REGISTRY", "STRATEGIES", "PLAIN", "POLICIES", "make_config", "make_step", "flat_step", "names",
           "parameters", "label", "config_class", "SplitConfig", "StrategyConfig", "DEVICES", "ONE_DEVICE", "RANKS"]

REGISTRY: dict[str, type[StrategyConfig]] = {cls.name: cls for cls in (
    NoStrategy, CheckpointLayer, CheckpointSegments, CheckpointSqrt, CheckpointEveryK, CheckpointBudget,
    CheckpointSelective, CompileBudget, Microbatch,
    PipelineGPipe, Pipeline1F1B, PipelineInterleaved, DDP, FSDP, TensorParallel, ModelParallel,
)}
STRATEGIES: tuple[str, ...] = tuple(REGISTRY)
PLAIN: str = NoStrategy.name


def names(placement: str | None = None, accumulates: bool | None = None,
          in_timeline_plot: bool | None = None) -> tuple[str, ...]:
    """Strategy names, optionally only those that run in ``placement``, that accumulate, or
    that the report's timeline plot draws."""
    return tuple(name for name, cls in REGISTRY.items()
                 if (placement is None or cls.placement == placement)
                 and (accumulates is None or cls.accumulates == accumulates)
                 and (in_timeline_plot is None or cls.in_timeline_plot == in_timeline_plot))


def config_class(name: str) -> type[StrategyConfig]:
    if name not in REGISTRY:
        raise SpecError("strategy", name, ", ".join(STRATEGIES))
    return REGISTRY[name]


def parameters(name: str | None = None) -> tuple[str, ...]:
    """The parameter fields of one strategy, or of every strategy (in registry order)."""
    classes = [config_class(name)] if name is not None else list(REGISTRY.values())
    return tuple(dict.fromkeys(f.name for cls in classes for f in dataclasses.fields(cls)))


def make_config(name: str, **params: Any) -> StrategyConfig:
    """The typed config of strategy ``name``. A parameter it does not take is an error naming
    the field, except ``world_size=1`` for a strategy that runs on one device."""
    cls = config_class(name)
    own = parameters(name)
    for key, value in params.items():
        if key not in own and not (key == "world_size" and value == 1):
            takes = ", ".join(own) if own else "no parameters"
            raise SpecError(key, value, f"not a parameter of {name}, which takes {takes}")
    return cls(**{k: v for k, v in params.items() if k in own})


def make_step(strategy: str = PLAIN, **fields: Any) -> StepSpec:
    """A StepSpec from flat fields, as the CLI and config files give them:
    ``make_step("checkpoint-segments", segments=2, batch_size=64)``."""
    step_fields = {f.name for f in dataclasses.fields(StepSpec)} - {"strategy"}
    params = {k: v for k, v in fields.items() if k not in step_fields}
    return StepSpec(strategy=make_config(strategy, **params), **{k: v for k, v in fields.items() if k in step_fields})


def flat_step(step: StepSpec) -> dict[str, Any]:
    """The inverse of ``make_step``: the step's fields with the strategy as its name and
    its parameters beside them (JSON for the worker, the ``config`` echo of ``--json``)."""
    out = {f.name: getattr(step, f.name) for f in dataclasses.fields(StepSpec)}
    out.update(strategy=step.strategy.name, **step.strategy.params())
    return out


def label(name: str, params: dict[str, Any]) -> str:
    """A short label for plots and tables: the name and the parameters that tell cells apart."""
    cls = REGISTRY.get(name)
    shown = (cls.label_params if cls is not None and cls.label_params is not None
             else parameters(name) if cls is not None else ())
    keep = [f"{k}={params[k]}" for k in shown if k in params]
    return name + (" " + ",".join(keep) if keep else "")
