"""The two torch modes through which a ``LiveTensorProbe`` watches a step, and how they let
``torch.compile`` run: the dispatch mode sees every aten op, the function mode hooks each
new autograd node (``bpmem.probes.live``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from bpmem.torch_private import FUNCTION_MODES, TorchDispatchMode


class ProbeMode:
    """A torch mode that reports to one probe."""

    def __init__(self, probe: Any) -> None:  # a bpmem.probes.live.LiveTensorProbe
        super().__init__()
        self._probe = probe


class LiveMode(ProbeMode, TorchDispatchMode):
    """Sees every aten op below autograd, so forward, backward and optimizer ops alike."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # torch.compile then compiles as if the probe were absent and runs what it compiled
        # under it: the probe sees the compiled graphs' aten ops (``aot_eager`` runs them one by
        # one), not an eager fallback. Any other mode on the stack makes dynamo run eagerly.
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        op = str(func.overloadpacket.__name__)
        bracket = self._probe.op_bracket  # the allocator view marks each op's span in its trace
        with bracket(op) if bracket is not None else contextlib.nullcontext():
            out = func(*args, **(kwargs or {}))
            self._probe._on_op(op, out, (args, kwargs))
        return out


class GraphHookMode(ProbeMode, TorchFunctionMode):
    """Sits above autograd, where results already carry their grad_fn, to hook new nodes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            self._probe._hook_graph(out)
        return out


@contextlib.contextmanager
def graph_hooks_set_aside() -> Iterator[None]:
    """Take the probes' graph-hooking function modes off the top of the stack for the block.

    Around a ``torch.compile``d call: dynamo would trace into a function mode (graph breaks at
    every ``grad_fn`` it reads) and compile other graphs than an unwatched step runs. The
    compiled function's outputs are hooked all the same, by the first op after it, whose
    graph walk reaches back through the compiled node."""
    with FUNCTION_MODES.set_aside_while(lambda top: isinstance(top, GraphHookMode)):
        yield
