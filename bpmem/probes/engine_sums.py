"""Where autograd's engine sums two gradients that meet at one input, and how the live probe
counts that sum on fake tensors as a real step makes it.

When two gradients reach one input (a residual add's two branches, a weight used twice), the
engine adds them. With grad mode off (any backward without ``create_graph``) it reuses a
buffer: ``old.add_(new)`` if it holds the only reference to ``old`` and ``old`` is dense,
else ``new.add_(old)`` on the same terms, else ``old + new``. A tensor subclass, and so a fake
tensor, never qualifies. So under ``FakeTensorMode`` every such sum is a fresh buffer that a
real step never allocates, and the fake step's peak drifts from the real one (a ResNet's
``hvp`` by one activation). ``EngineSums`` watches those sums on fake tensors and counts
each as the real engine's in-place add: the result joins the storage it would have reused.
On real tensors it does the same where one node hands on sums of both kinds: the probe then
stays on the stack, so that an out-of-place sum is seen beside its inputs, as it is made.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

from bpmem.probes.tracking import storage_id


def storage_id_or_none(tensor: torch.Tensor) -> int | None:
    """``storage_id``, or None for a tensor with no storage (sparse, a wrapper subclass)."""
    try:
        return storage_id(tensor)
    except (RuntimeError, NotImplementedError):
        return None


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` covers its memory exactly once (no gaps, no overlap), in any
    order of dimensions: what ``is_non_overlapping_and_dense`` asks of an in-place sum."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def in_place_target(first: Any, second: Any, sole_owner: Any) -> torch.Tensor | None:
    """The gradient a real engine adds into, of the ``first + second`` it sums (None: out of
    place). ``sole_owner(tensor)``: whether it is the only tensor on its storage."""
    for candidate in (first, second):
        if isinstance(candidate, torch.Tensor) and is_dense(candidate) and sole_owner(candidate):
            return candidate
    return None


_NODE_NUMBERS = itertools.count()
_OWNED = object()


class EngineSums:
    """The live probe's part that follows the engine's sums of gradients.

    The probe sets ``_engine_sums`` after an autograd node ran with grad mode off whose
    gradients the engine will sum in place (on fake tensors; or on real ones when the node
    also hands on an out-of-place sum), and clears it when the next node starts; an ``add``
    in between is the engine's sum. An in-place one's result is redirected to the storage the
    real engine reuses, which is held until the probe frees it, so that no new storage takes
    its key (a fake storage costs nothing; a real one is the step's own buffer).
    """

    _tracked: dict[int, Any]
    _current_op: str

    def __init__(self) -> None:
        self._engine_sums = False
        self._redirect: dict[int, int] = {}  # a fake sum's storage -> the one a real sum reuses
        self._redirect_aliases: dict[int, int] = {}  # live tensors on each redirected storage
        self._held: dict[int, Any] = {}
        # the gradient waiting in each next node's input buffer: node number -> input -> the
        # tensor (a weak reference), or _OWNED for a sum the engine made and alone holds
        self._pending: dict[int, dict[int, Any]] = {}
        self._number_key = f"bpmem-node-number-{id(self)}"

    def _number(self, node: Any) -> int:
        """A number for an autograd node, kept in its own metadata (ids are reused)."""
        if self._number_key not in node.metadata:
            node.metadata[self._number_key] = next(_NODE_NUMBERS)
        return node.metadata[self._number_key]

    def _edges(self, node: Any) -> tuple[tuple[int, int] | None, ...]:
        """Where each of ``node``'s outputs goes: (next node's number, its input), or None."""
        return tuple((self._number(n), nr) if n is not None else None for n, nr in node.next_functions)

    def _node_starts(self, number: int) -> None:
        self._engine_sums = False  # a node runs: what follows is its own work
        self._pending.pop(number, None)  # its input buffer is handed to it

    def _coming_sums(self, edges: tuple[Any, ...], grad_inputs: Any) -> tuple[bool, bool]:
        """Note where this node's gradients go. Returns whether the engine will sum one of them
        in place with a gradient already waiting there, and whether one out of place."""
        in_place = out_of_place = False
        for edge, grad in zip(edges, grad_inputs, strict=False):
            if edge is None or not isinstance(grad, torch.Tensor):
                continue
            waiting = self._pending.setdefault(edge[0], {})
            earlier = waiting.get(edge[1])
            if earlier is None:
                waiting[edge[1]] = weakref.ref(grad)
                continue
            if earlier is _OWNED:
                in_place = True  # the engine's own sum: it holds the only reference
                continue
            target = in_place_target(earlier(), grad, self._sole_owner)
            in_place, out_of_place = in_place or target is not None, out_of_place or target is None
            waiting[edge[1]] = _OWNED if target is None else weakref.ref(target)
        return in_place, out_of_place

    def _sole_owner(self, tensor: torch.Tensor) -> bool:
        tracked = self._tracked.get(self._key(tensor))
        return tracked is not None and tracked.aliases == 1

    def _key(self, tensor: torch.Tensor) -> int | None:
        """The ledger's key for ``tensor``'s storage, through any redirect."""
        key = storage_id_or_none(tensor)
        return self._redirect.get(key, key) if key is not None else None

    def _as_real_sum(self, out: Any, args: Any) -> bool:
        """Count ``out = args[0] + args[1]`` as the real engine's in-place sum, if it makes one."""
        target = in_place_target(args[0], args[1], self._sole_owner) if len(args) == 2 else None
        if target is None or not isinstance(out, torch.Tensor):
            return False
        key = self._key(target)
        raw = storage_id_or_none(out)
        self._redirect[raw], self._redirect_aliases[raw] = key, 0
        self._held.setdefault(key, target.untyped_storage())  # keeps its key from a new storage
        self._current_op = f"{self._current_op} (gradient sum, in place)"
        self._track_alias(out)
        self._note(self._current_op)
        return True

    def _watch_alias(self, tensor: torch.Tensor, key: int) -> None:
        """Call back when ``tensor``, one more alias of ``key``'s storage, dies; an alias of a
        redirected sum also counts towards its redirect, which goes with its last alias."""
        raw = storage_id_or_none(tensor)
        if raw is not None and self._redirect.get(raw) == key:
            self._redirect_aliases[raw] += 1
            weakref.finalize(tensor, self._on_redirect_alias_dead, raw, key)
        else:
            weakref.finalize(tensor, self._on_alias_dead, key)

    def _on_redirect_alias_dead(self, raw: int, key: int) -> None:
        self._redirect_aliases[raw] -= 1
        if self._redirect_aliases[raw] == 0:  # the sum's storage is gone: its key may return
            del self._redirect[raw], self._redirect_aliases[raw]
        self._on_alias_dead(key)

    def _release(self, key: int) -> None:
        """The probe freed ``key``: let its held storage go."""
        self._held.pop(key, None)

    # provided by LiveTensorProbe
    def _note(self, op: str) -> None: ...

    def _track_alias(self, tensor: torch.Tensor) -> None: ...

    def _on_alias_dead(self, key: int) -> None: ...
