"""``SavedTensorProbe``: what autograd saves for backward, per layer (bpmem's MLP cells)."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import CodeType
from typing import Any

import torch
from torch import nn

from bpmem.probes.common import is_leaf_param, local_tensor, storage_key
from bpmem.probes.tracking import SAVED
from bpmem.torch_private import running_backward


def _reentrant_backward_code() -> CodeType | None:
    """The code of ``torch.utils.checkpoint``'s reentrant backward, which re-runs the forward."""
    from torch.utils import checkpoint

    backward = getattr(getattr(checkpoint, "CheckpointFunction", None), "backward", None)
    return getattr(backward, "__code__", None)


_REENTRANT_BACKWARD = _reentrant_backward_code()


def _inside_reentrant_backward() -> bool:
    """Whether ``torch.utils.checkpoint``'s reentrant backward is on this thread's stack."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is _REENTRANT_BACKWARD:
            return True
        frame = frame.f_back
    return False


@dataclass
class _Saved:
    """One storage autograd was handed: its first saver and its size."""

    label: str
    nbytes: int


class SavedTensorProbe:
    """Bytes autograd saves for backward, deduplicated by storage, parameters excluded.

    Each saved tensor is attributed to the innermost module whose forward was running when
    autograd packed it (forward hooks on every module of ``model`` but the root), or to the label of the
    innermost ``scope()`` the caller opened (e.g. "loss"), else to "outside". A storage saved
    twice while it lives (a ReLU output is also the next Linear's input) counts once, for its
    first saver. A storage is known by the address of its StorageImpl only while it lives: one
    made later at a freed storage's address is another storage and counts on its own (the
    allocator's reuse of addresses, which differs from run to run, changes no figure).

    ``saved_activation_bytes`` (the ``saved_hook_bytes`` of a measurement) is the sum over
    those storages, and ``per_layer()`` splits exactly that sum: its rows add up to it. Saves
    made during backward count too (a ``create_graph`` backward's, which the second backward
    of H v needs), but for one kind:

    Reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``, or any module
    whose forward autograd's backward calls) runs the forward under ``no_grad``, so autograd
    saves only each checkpoint's inputs (its ``ctx.save_for_backward``, attributed to the module
    that called ``checkpoint``, "outside" at the root); its backward then re-runs the forward
    with grad enabled and at once differentiates and frees what that saved. Those saves, made
    inside backward by a forward that runs again (inside ``CheckpointFunction.backward``, or
    inside a module's forward while backward runs), are not counted: they are no activation
    the forward retains, and they live only within that checkpoint's backward. So under
    reentrant checkpointing ``saved_activation_bytes`` is what autograd holds through its
    SavedVariables at the end of the forward, and equals the live-storage figure
    (``Figures.saved_activation_bytes``) to the byte.

    Without a model, ``exclude_leaf_params=True`` treats any leaf that requires grad (and
    views of one, like ``W.t()``) as a parameter: an input made with requires_grad=True
    would then not count either.

    Cannot see: memory that an op keeps outside autograd's SavedVariables, such as what
    non-reentrant checkpointing stores in its own frames, or cuDNN/oneDNN workspaces.
    """

    def __init__(self, model: nn.Module | None = None, exclude: Iterable[torch.Tensor] = (),
                 exclude_leaf_params: bool = False) -> None:
        self._model = model
        self._exclude_leaf_params = exclude_leaf_params
        excluded = list(exclude) + (list(model.parameters()) if model is not None else [])
        self._excluded = {storage_key(t) for t in excluded}
        self._saved: list[_Saved] = []  # every storage counted, in the order first saved
        self._alive: dict[int, weakref.ref] = {}  # storage address -> the counted storage there
        self._labels: list[str] = []
        self._order: list[str] = []
        self._modules_running = 0  # forwards of the model's modules now running (hooks)
        self._handles: list[Any] = []
        self._hooks: contextlib.AbstractContextManager | None = None
        self.retained_bytes = 0  # saved storages still alive now
        self.peak_retained_bytes = 0  # the most that were alive at once (pipelines: in flight)

    @contextlib.contextmanager
    def scope(self, label: str) -> Iterator[None]:
        """Attribute what is saved inside the block to ``label`` (e.g. "loss", "regularizer")."""
        self._labels.append(label)
        self._note_label(label)
        try:
            yield
        finally:
            self._labels.pop()

    def _note_label(self, label: str) -> None:
        if label not in self._order:
            self._order.append(label)

    def _is_recomputation(self) -> bool:
        """A pack inside backward by a forward that runs again (reentrant checkpointing)."""
        return running_backward() and (self._modules_running > 0 or _inside_reentrant_backward())

    def _counted(self, key: int) -> bool:
        """Whether the storage now at address ``key`` is one already counted (still alive)."""
        alive = self._alive.get(key)
        return alive is not None and alive() is not None

    def on_pack(self, tensor: torch.Tensor, packed: Any) -> None:
        """A pack event from ``bpmem.probes.tracking.SAVED``, which every active probe hears."""
        key = storage_key(tensor)
        if key in self._excluded or (self._exclude_leaf_params and is_leaf_param(tensor)):
            return
        if self._counted(key) or self._is_recomputation():
            return
        storage = local_tensor(tensor).untyped_storage()
        label = self._labels[-1] if self._labels else "outside"
        self._note_label(label)
        saved = _Saved(label, storage.nbytes())
        self._saved.append(saved)
        self._alive[key] = weakref.ref(storage)
        self.retained_bytes += saved.nbytes
        self.peak_retained_bytes = max(self.peak_retained_bytes, self.retained_bytes)
        weakref.finalize(storage, self._release, saved.nbytes)

    def _release(self, nbytes: int) -> None:
        self.retained_bytes -= nbytes

    def __enter__(self) -> SavedTensorProbe:
        if self._model is not None:
            for name, module in self._model.named_modules():
                if name:  # every module but the root; the innermost running one owns what is saved
                    label = f"{name}.{type(module).__name__}"
                    self._handles.append(module.register_forward_pre_hook(self._enter_module(label)))
                    self._handles.append(module.register_forward_hook(self._leave_module(), always_call=True))
        self._hooks = SAVED.listening(self)
        self._hooks.__enter__()
        return self

    def _enter_module(self, label: str):
        def hook(module: nn.Module, args: Any) -> None:
            self._labels.append(label)
            self._note_label(label)
            self._modules_running += 1

        return hook

    def _leave_module(self):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._labels.pop()
            self._modules_running -= 1

        return hook

    def __exit__(self, *exc_info: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc_info)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def saved_activation_bytes(self) -> int:
        return sum(saved.nbytes for saved in self._saved)

    def packed_bytes_of(self, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes of those of ``tensors``' storages that autograd saved (e.g. the input batch)."""
        keys = {storage_key(t): local_tensor(t).untyped_storage().nbytes() for t in tensors}
        return sum(nbytes for key, nbytes in keys.items() if self._counted(key))

    def per_layer(self) -> list[dict[str, Any]]:
        """[{"name": "0.Linear", "saved_bytes": N}, ...] in the order the layers ran; the rows
        add up to ``saved_activation_bytes``."""
        totals = dict.fromkeys(self._order, 0)
        for saved in self._saved:
            totals[saved.label] += saved.nbytes
        return [{"name": label, "saved_bytes": total} for label, total in totals.items()]

    def result(self) -> dict[str, Any]:
        return {"saved_activation_bytes": self.saved_activation_bytes, "per_layer": self.per_layer()}
