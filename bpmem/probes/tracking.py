"""Shared hooks that every probe listens to, so that probes nest.

PyTorch keeps one stack of ``saved_tensors_hooks`` and calls only the innermost pair, and
module hooks are per module. A probe that pushed its own hooks would blind the probe around
it (a ``bpmem`` fixture inside a ``limit_tensor_memory`` test saw 0 B). So bpmem installs
each kind of hook once, while any probe listens, and hands every event to all listeners:

- ``SAVED``: the pack hook of autograd's saved tensors. Each saved tensor is wrapped in a
  ``Packed`` object that autograd owns for as long as it keeps the tensor for a backward;
  listeners are told when it is packed and when autograd lets go of it (the wrapper dies),
  which is what "held by autograd" means, exactly and deterministically.
- ``MODULES``: global forward pre- and post-hooks on every ``nn.Module``: the stack of
  modules whose forward is running, innermost last, for attribution by module path
  (non-leaf modules too: ``nn.MultiheadAttention`` computes without calling its children).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from bpmem.torch_private import running_backward, tensor_storage_address


class Packed:
    """What autograd stores in place of a saved tensor while a listener is active.

    It keeps a detached alias: the same storage, without the ``grad_fn``. Keeping the tensor
    itself would close a reference cycle for a saved output (node -> saved variable -> this ->
    tensor -> node), so a graph deleted without a backward would live on until the garbage
    collector ran. Autograd puts the ``grad_fn`` back when it unpacks (double backward works)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()


class SavedListener(Protocol):
    def on_pack(self, tensor: torch.Tensor, packed: Packed) -> None:
        """Called for every tensor autograd saves; ``packed`` dies when autograd lets go."""


class _SavedHub:
    """One ``saved_tensors_hooks`` pair for all listeners of a thread, pushed while any
    listens. PyTorch keeps those hooks per thread, so the hub does too: a measurement in
    one thread neither hears nor disturbs another thread's."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def listeners(self) -> list[SavedListener]:
        if not hasattr(self._local, "listeners"):
            self._local.listeners, self._local.hooks = [], None
        return self._local.listeners

    def _pack(self, tensor: torch.Tensor) -> Any:
        packed = Packed(tensor)
        for listener in list(self.listeners):
            listener.on_pack(tensor, packed)
        return packed

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.tensor

    @contextlib.contextmanager
    def listening(self, listener: SavedListener) -> Iterator[None]:
        """Deliver this thread's pack events to ``listener`` inside the block."""
        listeners = self.listeners
        if not listeners:
            self._local.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._local.hooks.__enter__()
        listeners.append(listener)
        try:
            yield
        finally:
            listeners.remove(listener)
            if not listeners and self._local.hooks is not None:
                hooks, self._local.hooks = self._local.hooks, None
                hooks.__exit__(None, None, None)


class _ModuleTracker:
    """The modules whose forward is running (innermost last) and names for them."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._users = 0
        self._handles: list[Any] = []
        self.names: dict[int, str] = {}  # id(module) -> path, from every model a listener named
        self.on_enter: list[Callable[[nn.Module], None]] = []

    @property
    def stack(self) -> list[nn.Module]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def _pre(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)
        for callback in list(self.on_enter):
            callback(module)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = self.stack
        if stack and stack[-1] is module:
            stack.pop()
        elif module in stack:  # a forward that raised inside a child: unwind to this module
            del stack[len(stack) - 1 - stack[::-1].index(module):]

    def current(self) -> str:
        """Path of the innermost running module; "(backward)" inside autograd's backward when
        no forward runs (a recomputation's forward does), else "outside"."""
        stack = self.stack
        if not stack:
            return "(backward)" if running_backward() else "outside"
        module = stack[-1]
        return self.names.get(id(module), type(module).__name__)

    @contextlib.contextmanager
    def tracking(self, model: nn.Module | None = None) -> Iterator[None]:
        """Track module forwards inside the block; name ``model``'s modules by path."""
        named = []
        if model is not None:
            root = type(model).__name__
            for path, module in model.named_modules():
                if id(module) not in self.names:
                    self.names[id(module)] = path or root
                    named.append(id(module))
        if self._users == 0:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

            self._handles = [register_module_forward_pre_hook(self._pre),
                             register_module_forward_hook(self._post, always_call=True)]
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            for key in named:
                self.names.pop(key, None)
            if self._users == 0:
                for handle in self._handles:
                    handle.remove()
                self._handles = []
                self.stack.clear()


SAVED = _SavedHub()
MODULES = _ModuleTracker()


def storage_id(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage without making a Python storage object (which would
    hold a second reference and change what autograd may do in place)."""
    return tensor_storage_address(tensor)


def release_callback(packed: Packed, callback: Callable[[], None]) -> None:
    """Call ``callback`` once autograd has let go of ``packed``."""
    weakref.finalize(packed, callback)
