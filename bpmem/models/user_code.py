"""Which code raised: the user's, or bpmem's, read off the traceback (no call site wraps).

An exception inside the user's factory, data function, forward or loss is exit 2 with the
user's file and line (``user_code_error``); one raised in bpmem's own code stays a bug,
exit 3 (``raised_by_bpmem``), even when the user's forward called it.
"""

from __future__ import annotations

import functools
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Any

from bpmem.models import ZOO_MODULES

# -- which code raised: the user's, or bpmem's (read off the traceback: no call site wraps) ----
# From the outermost frame in, frames are bpmem's until bpmem calls the user's files or a
# model (what nn.Module.__call__ runs, e.g. torch's BatchNorm1d in the user's Sequential); a
# later bpmem frame (a probe's hook) takes them back. torch, the stdlib and other packages act
# for their caller; bpmem's dispatch modes pass each op on, so an op failing under one is its
# caller's. The zoo (bpmem.models.gpt and .resnet) runs as a user's model would.

_PACKAGE = Path(__file__).resolve().parents[1]
# where the data loss runs: a frame there is the --loss's, on the model's output
_USER_MODEL_FILE = str(Path(__file__).with_name("user_model.py"))
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


def what_raised(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _shown(filename: str) -> str:
    """A path as short as it can be and still found: relative to here, or to site-packages."""
    path, parts = Path(filename), Path(filename).parts
    marker = next((m for m in ("site-packages", "dist-packages") if m in parts), None)
    if marker:
        return str(Path(*parts[parts.index(marker) + 1:]))
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else filename


def where_raised(frames: list[tuple[Any, int]], users: list[bool]) -> str:
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
            in_loss = code.co_name == "data_loss" and code.co_filename == _USER_MODEL_FILE and not innermost
            owner = "loss" if in_loss else "bpmem"
            shapes = " and ".join(f"{name} of shape {tuple(value.shape)}" for name in ("output", "target")
                               if hasattr(value := frame.f_locals.get(name), "shape"))
        users.append(owner == "model")
        by_module = kind == "torch" and code.co_name == "_call_impl"  # nn.Module.__call__ runs a forward
    if owner == "loss":
        return (f"--loss: {loss} raised {what_raised(error)} on the model's {shapes or 'output and target'}; "
                "allowed: an output and target that it takes (cross_entropy: logits (..., C) and integer targets "
                "(...); mse: "
                "equal shapes), or --loss none with a model that returns its loss")
    where = where_raised(frames, users) if owner == "model" else ""
    if owner == "bpmem":
        return None
    return f"--model: {factory} raised {what_raised(error)}" + (f" at {where}" if where else "")
