"""What every probe shares: the protocol, and how a tensor maps to the storage it owns."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch

from bpmem.torch_private import storage_address, view_base, wrapper_inner_tensors


class Probe(Protocol):
    """What every probe offers: enter, exit, then ``result()`` as named integer figures."""

    def __enter__(self) -> Probe: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def result(self) -> dict[str, Any]: ...


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor whose storage holds ``tensor``'s data on this process.

    A wrapper subclass (a DTensor, funcol's AsyncCollectiveTensor) owns no memory: its
    ``untyped_storage()`` is empty or raises, and its shape is the global one. Its data lives
    in one inner tensor (``_local_tensor``, ``elem``), which ``__tensor_flatten__`` names, so
    unwrap to that. Needs no import of ``torch.distributed``; a plain tensor is returned as is.
    """
    while (inner := wrapper_inner_tensors(tensor)) is not None:
        if len(inner) != 1:
            break
        tensor = inner[0]
    return tensor


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of the storage behind ``tensor``: views of one buffer share it.

    The key is the address of the C++ StorageImpl. It is unique while the storage lives,
    and unlike ``data_ptr()`` it is also distinct for meta tensors (whose data_ptr is 0).
    A DTensor's key is its local shard's.
    """
    return storage_address(local_tensor(tensor).untyped_storage())


def distinct_storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (None entries are skipped; a
    DTensor counts its local shard's storage)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None:
            seen.setdefault(storage_key(tensor), local_tensor(tensor).untyped_storage().nbytes())
    return sum(seen.values())


def is_leaf_param(tensor: torch.Tensor) -> bool:
    """A parameter-like leaf (requires grad, made by no op), or a view of one (W.t())."""
    base = view_base(tensor)
    return base.is_leaf and base.requires_grad
