"""Your own ``nn.Module`` behind the model seam: ``--model MODULE:FACTORY`` with its data.

``FACTORY(**kwargs)`` returns the module. A batch comes from ``--data MODULE:FUNC``
(``FUNC(batch_size, device)`` returns ``(inputs, target)``: inputs a tensor or a tuple of
tensors, passed to the model positionally; target a tensor, or None with ``--loss none``), or
from shapes with ``B`` for the batch size: ``--input 'float32[B,3,32,32]' --target 'int64[B]<10'``
(integer tensors need a range: ``<N`` draws from 0..N-1). The loss is ``cross_entropy``
(logits ``(..., C)`` against integer targets ``(...)``), ``mse``, or ``none`` (the model's
output is the scalar loss). The ordered blocks that checkpointing and pipelining cut are the
children of an ``nn.Sequential`` model, or of the ``ModuleList`` at ``--blocks PATH``.

Every failure to load is a ``UserModelError`` naming the flag: one line, exit 2.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from bpmem.models.batch import call_model, output_tensor
from bpmem.models.block_finder import FoundBlocks, find_blocks
from bpmem.models.user_code import (  # noqa: F401 - re-exported: callers ask user_model
    raised_by_bpmem,
    user_code_error,
    what_raised,
    where_raised,
)

LOSSES: tuple[str, ...] = ("cross_entropy", "mse", "none")
_DTYPES: tuple[str, ...] = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool")


class UserModelError(ValueError):
    """A user model, data function or shape that cannot be used; ``flag`` names the option."""

    def __init__(self, flag: str, message: str) -> None:
        self.flag = flag
        super().__init__(f"{flag}: {message}")


class UserCodeError(UserModelError):
    """The factory or the data function raised: the message says what and where, and the
    original exception is the cause, so ``BPMEM_DEBUG=1`` shows its traceback."""

    def __init__(self, flag: str, name: str, error: BaseException, allowed: str) -> None:
        # the frame that called the user's code is the traceback's first: skip it, so an
        # error in the call itself (a wrong keyword) has no place in the user's files
        frames = list(traceback.walk_tb(error.__traceback__))[1:]
        where = where_raised(frames, [True] * len(frames))
        self.located = bool(where)
        super().__init__(flag, f"{name} raised {what_raised(error)}" + (f" at {where}" if where else f"; {allowed}"))


def _importable_from_here() -> None:
    """The current directory on the import path, as ``python -m`` has it, so that ``--model
    mymodels:make`` finds ``mymodels.py`` where the user runs ``bpmem`` (the console script's
    own path holds only its bin folder). Appended, so that a user's file never shadows an
    installed package of the same name; the sweep's cell processes and torchrun's ranks
    start in the same directory and do the same."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)


def load_callable(text: str, flag: str) -> Any:
    """``pkg.module:name`` imported and looked up; errors name ``flag``."""
    module_name, sep, attribute = str(text).partition(":")
    if not sep or not module_name or not attribute:
        raise UserModelError(flag, f"{text!r} is not MODULE:NAME; allowed: e.g. bpmem.models.gpt:make_gpt")
    _importable_from_here()
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - an import can fail in any way; say which
        raise UserModelError(flag, f"cannot import {module_name!r}: {type(error).__name__}: {error}; allowed: a "
                                   "module in the current directory or on PYTHONPATH") from None
    found = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise UserModelError(flag, f"{module_name!r} has no {attribute!r}; allowed: a callable in that module")
        found = getattr(found, part)
    if not callable(found):
        raise UserModelError(flag, f"{text} is not callable; allowed: a function or class")
    return found


@dataclass(frozen=True)
class TensorShape:
    """One tensor of the shorthand: dtype, dims (ints, or "B" for the batch), integer range."""

    dtype: str
    dims: tuple[int | str, ...]
    high: int | None = None
    name: str = ""  # the keyword the model takes it by (input_ids=...); "" passes it positionally

    @classmethod
    def parse(cls, text: str, flag: str) -> TensorShape:
        named = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=(.*)", text)
        if named:
            return dataclasses.replace(cls.parse(named.group(2), flag), name=named.group(1))
        match = re.fullmatch(r"\s*(\w+)\[([^\]]*)\]\s*(?:<\s*([0-9]+)\s*)?", text)
        if not match or match.group(1) not in _DTYPES:
            raise UserModelError(flag, f"{text!r} is not a tensor shape; allowed: [NAME=]DTYPE[DIMS] with DTYPE one "
                                       f"of {', '.join(_DTYPES)} and B for the batch, e.g. 'float32[B,3,32,32]', "
                                       "'int64[B]<10' or input_ids='int64[B,128]<32000'")
        dims: list[int | str] = []
        for dim in (d.strip() for d in match.group(2).split(",") if d.strip()):
            if dim == "B" or (dim.isdigit() and int(dim) >= 1):
                dims.append(dim if dim == "B" else int(dim))
            else:
                raise UserModelError(flag, f"{text!r}: dimension {dim!r}; allowed: B or an integer >= 1")
        high = int(match.group(3)) if match.group(3) else None
        integer = not match.group(1).startswith(("float", "bfloat"))
        if integer and match.group(1) != "bool" and (high is None or high < 1):
            raise UserModelError(flag, f"{text!r}: an integer tensor needs a range; allowed: e.g. "
                                       f"'{match.group(1)}[{match.group(2)}]<10' (values 0..9)")
        return cls(match.group(1), tuple(dims), high)

    def make(self, batch_size: int, device: Any, generator: Any) -> Any:
        import torch

        shape = tuple(batch_size if d == "B" else d for d in self.dims)
        dtype = getattr(torch, self.dtype)
        if self.dtype == "bool":
            return torch.randint(0, 2, shape, generator=generator).to(device=device, dtype=dtype)
        if self.high is not None:
            return torch.randint(0, self.high, shape, generator=generator).to(device=device, dtype=dtype)
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    def __str__(self) -> str:
        """The shorthand ``parse`` reads back: ``float32[B,20]``, ``int64[B]<10``."""
        dims = ",".join(str(d) for d in self.dims)
        return (f"{self.name}=" if self.name else "") + f"{self.dtype}[{dims}]" + \
            (f"<{self.high}" if self.high is not None else "")


@dataclass(frozen=True)
class UserModel:
    """A user's module and data as a ``bpmem.models.workload.Workload``."""

    factory: str
    kwargs_json: str = "{}"
    data: str | None = None
    inputs: tuple[TensorShape, ...] = ()
    target: TensorShape | None = None
    loss: str = "cross_entropy"
    blocks_path: str | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UserModelError("--loss", f"{self.loss!r} is not allowed; allowed: {', '.join(LOSSES)}")
        try:
            kwargs = json.loads(self.kwargs_json)
        except json.JSONDecodeError as error:
            raise UserModelError("--model-kwargs", f"not JSON: {error}; allowed: an object, e.g. "
                                                   "'{\"layers\": 4}'") from None
        if not isinstance(kwargs, dict):
            raise UserModelError("--model-kwargs", "allowed: a JSON object, e.g. '{\"layers\": 4}'")
        if (self.data is None) == (not self.inputs):
            raise UserModelError("--data", "give either --data MODULE:FUNC or --input SHAPE (with --target); "
                                           "allowed: one of them")
        if self.data is None and (self.target is None) != (self.loss == "none"):
            raise UserModelError("--target", "with --input, give --target SHAPE unless --loss none; allowed: "
                                             "e.g. --target 'int64[B]<10'")
        if len({bool(shape.name) for shape in self.inputs}) > 1:
            raise UserModelError("--input", "some inputs are named and some are not; allowed: all positional, or "
                                            "all by keyword (NAME=SHAPE)")
        load_callable(self.factory, "--model")
        if self.data is not None:
            load_callable(self.data, "--data")
        object.__setattr__(self, "name", self.name or self.factory)

    def cell_fields(self) -> dict[str, Any]:
        """The fields as JSON values (shapes as their shorthand): what a worker process gets in
        its ``--cell`` to build the very same model (``from_cell_fields``)."""
        return {"factory": self.factory, "kwargs_json": self.kwargs_json, "data": self.data,
                "inputs": [str(shape) for shape in self.inputs],
                "target": None if self.target is None else str(self.target), "loss": self.loss,
                "blocks_path": self.blocks_path}

    @classmethod
    def from_cell_fields(cls, fields: dict[str, Any]) -> UserModel:
        """The model ``cell_fields`` described; loading it again checks the factory and data."""
        target = fields.get("target")
        return cls(fields["factory"], fields.get("kwargs_json", "{}"), fields.get("data"),
                   tuple(TensorShape.parse(text, "--input") for text in fields.get("inputs", ())),
                   TensorShape.parse(target, "--target") if target else None, fields.get("loss", "cross_entropy"),
                   fields.get("blocks_path"))

    # -- the Workload protocol ------------------------------------------------------------
    def build(self, device: Any = "cpu", seed: int | None = 0) -> Any:
        import torch

        from bpmem.torch_private import fake_mode_active, outside_fake_mode

        if seed is not None:
            torch.manual_seed(seed)
        wanted = torch.device(device)
        if fake_mode_active():
            # Fake parameters cannot be converted in place (``.to(torch.bfloat16)`` swaps
            # tensors, which a fake one refuses), so the factory runs on the meta device,
            # where nothing is allocated either, and the result becomes fake on ``device``.
            with outside_fake_mode(), torch.device("meta"):
                model = self._construct()
            return as_fake_on(model, wanted)
        model = self._construct()
        tensors = [*model.parameters(), *model.buffers()]
        moved = any(t.device.type != wanted.type or (wanted.index is not None and t.device.index != wanted.index)
                    for t in tensors)
        return model.to(wanted) if moved else model

    def _construct(self) -> Any:
        from torch import nn

        factory = load_callable(self.factory, "--model")
        try:
            model = factory(**json.loads(self.kwargs_json))
        except Exception as error:  # noqa: BLE001 - the factory is the user's code
            raise UserCodeError("--model", self.factory, error, "allowed: the keyword arguments FACTORY takes, in "
                                                                "--model-kwargs") from error
        if not isinstance(model, nn.Module):
            raise UserModelError("--model", f"{self.factory} returned {type(model).__name__}; allowed: an nn.Module")
        return model

    def make_batch(self, batch_size: int, device: Any = "cpu", seed: int = 0) -> tuple[Any, Any]:
        import torch

        if self.data is None:
            generator = torch.Generator().manual_seed(seed)
            made = tuple(shape.make(batch_size, device, generator) for shape in self.inputs)
            named = self.inputs[0].name != ""
            inputs = {s.name: t for s, t in zip(self.inputs, made, strict=True)} if named else \
                made[0] if len(made) == 1 else made
            target = self.target.make(batch_size, device, generator) if self.target is not None else None
            return inputs, target
        torch.manual_seed(seed)
        data = load_callable(self.data, "--data")
        try:
            batch = data(batch_size, torch.device(device))
        except Exception as error:  # noqa: BLE001 - the data function is the user's code
            raise UserCodeError("--data", self.data, error, "allowed: FUNC(batch_size, device) returning "
                                                            "(inputs, target)") from error
        return self._checked_batch(batch)

    def _checked_batch(self, batch: Any) -> tuple[Any, Any]:
        import torch

        allowed = ("allowed: (inputs, target), inputs a tensor, a tuple of tensors or a dict of them by keyword "
                   "(with plain flags beside them), target a tensor or None")
        if not isinstance(batch, tuple) or len(batch) != 2:
            raise UserModelError("--data", f"{self.data} returned {type(batch).__name__}; {allowed}")
        inputs, target = batch
        # a dict's other values are keyword flags (return_loss=True, use_cache=False): passed as they are
        tensors = tuple(v for v in inputs.values() if isinstance(v, torch.Tensor)) if isinstance(inputs, dict) \
            else inputs if isinstance(inputs, tuple) else (inputs,)
        if isinstance(inputs, dict) and not all(isinstance(k, str) for k in inputs):
            raise UserModelError("--data", f"{self.data} returned a dict whose keys are not all strings; {allowed}")
        if isinstance(inputs, dict) and not all(isinstance(v, (torch.Tensor, bool, int, float, str, type(None)))
                                                for v in inputs.values()):
            raise UserModelError("--data", f"{self.data} returned a dict with a value that is neither a tensor nor a "
                                           f"plain flag; {allowed}")
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise UserModelError("--data", f"{self.data} returned inputs that are not tensors; {allowed}")
        if target is None and self.loss != "none":
            raise UserModelError("--data", f"{self.data} returned no target, and --loss is {self.loss}; "
                                           "allowed: a target tensor, or --loss none")
        if target is not None and not isinstance(target, torch.Tensor):
            raise UserModelError("--data", f"{self.data} returned a target of type {type(target).__name__}; "
                                           f"{allowed}")
        return inputs, target

    def forward(self, model: Any, inputs: Any) -> Any:
        return call_model(model, inputs)

    def data_loss(self, output: Any, target: Any) -> Any:
        from torch import nn

        want = "loss" if self.loss == "none" else "logits"
        output, found = output_tensor(output, want)
        if output is None:
            raise UserModelError("--model", f"{self.factory}'s forward returned {found}; allowed: a tensor, a tuple "
                                            f"whose first element is one, or a mapping with {want!r} (a "
                                            "transformers ModelOutput: its loss with --loss none, its logits with "
                                            "cross_entropy or mse)")
        if self.loss == "none":
            if output.dim() != 0:
                raise UserModelError("--loss", f"none needs the model to return a scalar loss; it returned shape "
                                               f"{tuple(output.shape)}; allowed: cross_entropy, mse")
            return output
        if self.loss == "cross_entropy":
            return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
        return nn.functional.mse_loss(output, target)

    def regularizer(self, model: Any) -> None:
        return None  # weight decay, if any, belongs to the optimizer

    def blocks(self, model: Any) -> list[list[Any]]:
        from torch import nn

        if self.blocks_path is not None:
            try:
                container = model.get_submodule(self.blocks_path)
            except AttributeError:
                raise UserModelError("--blocks", f"the model has no submodule {self.blocks_path!r}; allowed: a "
                                                 "dotted path to an nn.ModuleList or nn.Sequential") from None
            return [[child] for child in container.children()]
        if isinstance(model, nn.Sequential):
            return [[child] for child in model.children()]
        found = find_blocks(model)
        if found is None:
            raise UserModelError("--blocks", f"{type(model).__name__} is not an nn.Sequential and has no ModuleList of "
                                             "two or more blocks of one class, so bpmem cannot find its chain; "
                                             "allowed: --blocks PATH naming the ModuleList of its ordered blocks, or "
                                             "a strategy that needs no chain (checkpoint-selective, microbatch)")
        return [[child] for child in model.get_submodule(found.path).children()]

    def found_blocks(self, model: Any) -> FoundBlocks | None:
        """The chain bpmem found itself (no ``--blocks``, not an ``nn.Sequential``), or None."""
        from torch import nn

        if self.blocks_path is not None or isinstance(model, nn.Sequential):
            return None
        return find_blocks(model)

    @property
    def analytic(self) -> None:
        return None


def as_fake_on(model: Any, device: Any) -> Any:
    """``model`` (built on the meta device) with every parameter and buffer replaced by a
    tensor of the same shape, strides, dtype and ``requires_grad`` on ``device``, made under
    the active fake mode. A parameter shared by two modules (a tied embedding) stays shared."""
    import torch
    from torch import nn

    made: dict[int, Any] = {}

    def like(tensor: Any) -> Any:
        if id(tensor) not in made:
            empty = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)
            made[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
        return made[id(tensor)]

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, like(param))
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, like(buffer))
    return model
