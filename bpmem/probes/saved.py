"""``SavedTensorProbe``: what autograd saves for backward, per layer (bpmem's MLP cells)."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from bpmem.probes.common import is_leaf_param, local_tensor, storage_key
from bpmem.tracking import SAVED


class SavedTensorProbe:
    """Bytes autograd saves for backward, deduplicated by storage, parameters excluded.

    Each saved tensor is attributed to the innermost module whose forward was running when
    autograd packed it (forward hooks on every module of ``model`` but the root), or to the label of the
    innermost ``scope()`` the caller opened (e.g. "loss"), else to "outside". A storage saved
    twice (a ReLU output is also the next Linear's input) counts once, for its first saver.

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
        self._owner: dict[int, str] = {}
        self._bytes: dict[int, int] = {}
        self._alive: dict[int, weakref.ref] = {}
        self._labels: list[str] = []
        self._order: list[str] = []
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

    def on_pack(self, tensor: torch.Tensor, packed: Any) -> None:
        """A pack event from ``bpmem.tracking.SAVED``, which every active probe hears."""
        key = storage_key(tensor)
        if key in self._excluded or (self._exclude_leaf_params and is_leaf_param(tensor)):
            return
        alive = self._alive.get(key)
        if alive is None or alive() is None:  # first sight, or an old address reused
            storage = local_tensor(tensor).untyped_storage()
            label = self._labels[-1] if self._labels else "outside"
            self._note_label(label)
            self._owner[key] = label
            self._bytes[key] = storage.nbytes()
            self._alive[key] = weakref.ref(storage)
            self.retained_bytes += self._bytes[key]
            self.peak_retained_bytes = max(self.peak_retained_bytes, self.retained_bytes)
            weakref.finalize(storage, self._release, self._bytes[key])

    def _release(self, nbytes: int) -> None:
        self.retained_bytes -= nbytes

    def __enter__(self) -> SavedTensorProbe:
        if self._model is not None:
            for name, module in self._model.named_modules():
                if name:  # every module but the root; the innermost running one owns what is saved
                    label = f"{name}.{type(module).__name__}"
                    self._handles.append(module.register_forward_pre_hook(self._enter_module(label)))
                    self._handles.append(module.register_forward_hook(self._leave_module()))
        self._hooks = SAVED.listening(self)
        self._hooks.__enter__()
        return self

    def _enter_module(self, label: str):
        def hook(module: nn.Module, args: Any) -> None:
            self._labels.append(label)
            self._note_label(label)

        return hook

    def _leave_module(self):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._labels.pop()

        return hook

    def __exit__(self, *exc_info: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc_info)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def saved_activation_bytes(self) -> int:
        return sum(self._bytes.values())

    def packed_bytes_of(self, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes of those of ``tensors``' storages that autograd saved (e.g. the input batch)."""
        keys = {storage_key(t): local_tensor(t).untyped_storage().nbytes() for t in tensors}
        return sum(nbytes for key, nbytes in keys.items() if key in self._bytes)

    def per_layer(self) -> list[dict[str, Any]]:
        """[{"name": "0.Linear", "saved_bytes": N}, ...] in the order the layers ran."""
        totals = dict.fromkeys(self._order, 0)
        for key, label in self._owner.items():
            totals[label] += self._bytes[key]
        return [{"name": label, "saved_bytes": total} for label, total in totals.items()]

    def result(self) -> dict[str, Any]:
        return {"saved_activation_bytes": self.saved_activation_bytes, "per_layer": self.per_layer()}
