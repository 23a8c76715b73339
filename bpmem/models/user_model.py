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

import functools
import importlib
import json
import re
import sys
import sysconfig
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpmem.models import ZOO_MODULES

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
        where = _place(frames, [True] * len(frames))
        self.located = bool(where)
        super().__init__(flag, f"{name} raised {_what(error)}" + (f" at {where}" if where else f"; {allowed}"))


def load_callable(text: str, flag: str) -> Any:
    """``pkg.module:name`` imported and looked up; errors name ``flag``."""
    module_name, sep, attribute = str(text).partition(":")
    if not sep or not module_name or not attribute:
        raise UserModelError(flag, f"{text!r} is not MODULE:NAME; allowed: e.g. bpmem.models.gpt:make_gpt")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - an import can fail in any way; say which
        raise UserModelError(flag, f"cannot import {module_name!r}: {type(error).__name__}: {error}") from None
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

    @classmethod
    def parse(cls, text: str, flag: str) -> TensorShape:
        match = re.fullmatch(r"\s*(\w+)\[([^\]]*)\]\s*(?:<\s*([0-9]+)\s*)?", text)
        if not match or match.group(1) not in _DTYPES:
            raise UserModelError(flag, f"{text!r} is not a tensor shape; allowed: DTYPE[DIMS] with DTYPE one of "
                                       f"{', '.join(_DTYPES)} and B for the batch, e.g. 'float32[B,3,32,32]' or "
                                       "'int64[B]<10'")
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
        return f"{self.dtype}[{dims}]" + (f"<{self.high}" if self.high is not None else "")


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
            inputs = made[0] if len(made) == 1 else made
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

        allowed = "allowed: (inputs, target), inputs a tensor or a tuple of tensors, target a tensor or None"
        if not isinstance(batch, tuple) or len(batch) != 2:
            raise UserModelError("--data", f"{self.data} returned {type(batch).__name__}; {allowed}")
        inputs, target = batch
        tensors = inputs if isinstance(inputs, tuple) else (inputs,)
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
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)

    def data_loss(self, output: Any, target: Any) -> Any:
        import torch
        from torch import nn

        if not isinstance(output, torch.Tensor):  # e.g. a transformers ModelOutput, or a tuple
            raise UserModelError("--model", f"{self.factory}'s forward returned {type(output).__name__}; allowed: "
                                            "a tensor (the logits, or with --loss none the scalar loss)")
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
        raise UserModelError("--blocks", f"{type(model).__name__} is not an nn.Sequential, so bpmem cannot run its "
                                         "blocks as a chain; allowed: an nn.Sequential model, or a strategy that "
                                         "needs no chain (checkpoint-selective, microbatch)")

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


# -- which code raised: the user's, or bpmem's (read off the traceback: no call site wraps) ----
# From the outermost frame in, frames are bpmem's until bpmem calls the user's files or a
# model (what nn.Module.__call__ runs, e.g. torch's BatchNorm1d in the user's Sequential); a
# later bpmem frame (a probe's hook) takes them back. torch, the stdlib and other packages act
# for their caller; bpmem's dispatch modes pass each op on, so an op failing under one is its
# caller's. The zoo (bpmem.models.gpt and .resnet) runs as a user's model would.

_PACKAGE = Path(__file__).resolve().parents[1]
_ZOO = tuple(_PACKAGE / "models" / f"{name}.py" for name in ZOO_MODULES)
_PASS_ON = frozenset({"__torch_dispatch__", "__torch_function__"})


@functools.lru_cache(maxsize=1024)
def _kind(filename: str) -> str:
    """"bpmem", "torch", "stdlib", "package" (another installed package) or "user"."""
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return "stdlib"
    path = Path(filename).resolve()
    if path in _ZOO:
        return "user"
    if path.is_relative_to(_PACKAGE):
        return "bpmem"
    torch = sys.modules.get("torch")
    if torch is not None and path.is_relative_to(Path(torch.__file__).resolve().parent):
        return "torch"
    if {"site-packages", "dist-packages"} & set(path.parts):
        return "package"
    return "stdlib" if path.is_relative_to(Path(sysconfig.get_paths()["stdlib"]).resolve()) else "user"


def _what(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _shown(filename: str) -> str:
    """A path as short as it can be and still found: relative to here, or to site-packages."""
    path, parts = Path(filename), Path(filename).parts
    marker = next((m for m in ("site-packages", "dist-packages") if m in parts), None)
    if marker:
        return str(Path(*parts[parts.index(marker) + 1:]))
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else filename


def _place(frames: list[tuple[Any, int]], users: list[bool]) -> str:
    """The innermost of the user's frames worth naming: one in the user's own files, else in
    an installed package the model runs (transformers), else a module's forward in torch
    (the user's BatchNorm1d); "" when there is none."""
    mine = [(frame, line) for (frame, line), user in zip(frames, users, strict=True) if user]
    for wanted in ("user", "package"):
        found = [(f, n) for f, n in mine if _kind(f.f_code.co_filename) == wanted]
        if found:
            frame, line = found[-1]
            return f"{_shown(frame.f_code.co_filename)}:{line} in {frame.f_code.co_qualname}"
    for frame, line in reversed(mine):
        module = frame.f_locals.get("self") if frame.f_code.co_name == "forward" else None
        if module is not None and hasattr(module, "named_modules"):  # an nn.Module
            return f"{_shown(frame.f_code.co_filename)}:{line} in {type(module).__name__}.forward"
    return ""


def raised_by_bpmem(error: BaseException) -> bool:
    """Whether bpmem's own code (not torch's, the user's or a package's) raised ``error``."""
    frames = list(traceback.walk_tb(error.__traceback__))
    return bool(frames) and _kind(frames[-1][0].f_code.co_filename) == "bpmem"


def user_code_error(error: BaseException, factory: str, loss: str) -> str | None:
    """One line for an exception that the user's model, or torch's --loss on the model's
    output and target, raised: what and where (for the CLI's error and a sweep row's). None
    when bpmem raised it: a bug."""
    frames = list(traceback.walk_tb(error.__traceback__))
    owner, by_module, users, shapes = "bpmem", False, [], ""
    for index, (frame, _) in enumerate(frames):
        code, innermost = frame.f_code, index == len(frames) - 1
        kind = _kind(code.co_filename)
        if kind == "user" or (by_module and kind != "bpmem"):
            owner = "model"
        elif kind == "bpmem" and (innermost or code.co_name not in _PASS_ON):
            # torch's loss on the user's output and target fails on their shapes, not bpmem's
            in_loss = code.co_name == "data_loss" and code.co_filename == __file__ and not innermost
            owner = "loss" if in_loss else "bpmem"
            shapes = " and ".join(f"{name} of shape {tuple(value.shape)}" for name in ("output", "target")
                               if hasattr(value := frame.f_locals.get(name), "shape"))
        users.append(owner == "model")
        by_module = kind == "torch" and code.co_name == "_call_impl"  # nn.Module.__call__ runs a forward
    if owner == "loss":
        return (f"--loss: {loss} raised {_what(error)} on the model's {shapes or 'output and target'}; allowed: an "
                "output and target that it takes (cross_entropy: logits (..., C) and integer targets (...); mse: "
                "equal shapes), or --loss none with a model that returns its loss")
    where = _place(frames, users) if owner == "model" else ""
    if owner == "bpmem":
        return None
    return f"--model: {factory} raised {_what(error)}" + (f" at {where}" if where else "")
