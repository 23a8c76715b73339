"""Probes: four ways to watch one step's memory, behind one small protocol.

Every probe is a context manager. Enter it around the work, then read ``result()``, a
dict of integer byte figures named as in the README's table of figures. Each probe says what it cannot see.

- ``SavedTensorProbe``: what autograd keeps for backward (``saved_tensors_hooks``).
- ``LiveTensorProbe``: every tensor storage an aten op creates, until it dies (a
  ``TorchDispatchMode`` plus ``weakref.finalize``); gives the peak and a timeline.
- ``CudaProbe``: the CUDA caching allocator's own peak counters.
- ``RssProbe``: the process's resident set, sampled by psutil in a thread.

The first two are exact and deterministic on CPU (and work on CUDA and meta alike), which
is why bpmem's predictions are checked against them to the byte.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from bpmem.tracking import SAVED

__all__ = [
    "Probe",
    "SavedTensorProbe",
    "LiveTensorProbe",
    "TimelineEvent",
    "AllocatorTraceProbe",
    "CudaProbe",
    "RssProbe",
    "storage_key",
    "local_tensor",
    "distinct_storage_bytes",
]


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
    while is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        inner = [t for t in (getattr(tensor, name) for name in names) if isinstance(t, torch.Tensor)]
        if len(inner) != 1:
            break
        tensor = inner[0]
    return tensor


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of the storage behind ``tensor``: views of one buffer share it.

    ``_cdata`` is the address of the C++ StorageImpl. It is unique while the storage lives,
    and unlike ``data_ptr()`` it is also distinct for meta tensors (whose data_ptr is 0).
    A DTensor's key is its local shard's.
    """
    return local_tensor(tensor).untyped_storage()._cdata


def distinct_storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (None entries are skipped; a
    DTensor counts its local shard's storage)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None:
            seen.setdefault(storage_key(tensor), local_tensor(tensor).untyped_storage().nbytes())
    return sum(seen.values())


def _is_leaf_param(tensor: torch.Tensor) -> bool:
    """A parameter-like leaf (requires grad, made by no op), or a view of one (W.t())."""
    base = tensor._base if tensor._base is not None else tensor
    return base.is_leaf and base.requires_grad


class SavedTensorProbe:
    """Bytes autograd saves for backward, deduplicated by storage, parameters excluded.

    Each saved tensor is attributed to the module whose forward was running when autograd
    packed it (a forward pre-hook on every leaf module of ``model``), or to the label of the
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
        if key in self._excluded or (self._exclude_leaf_params and _is_leaf_param(tensor)):
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
                if next(module.children(), None) is None:  # leaf modules only
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


@dataclass(frozen=True)
class TimelineEvent:
    """The live bytes just after one aten op (or one free), by category."""

    index: int
    op: str
    phase: str
    live_bytes: int
    by_category: Mapping[str, int]


@dataclass
class _Tracked:
    nbytes: int
    category: str
    op: str = ""
    aliases: int | None = None  # None: tracked by its storage object; else live alias count
    module: str = ""  # the module running when it was made (with ``module_of``)
    role: str = ""  # what it turned out to be, set later by bpmem.api: "gradients", "optimizer"


@contextlib.contextmanager
def _on_top(mode: Any, length: Any, at: Any, pop: Any, push: Any) -> Iterator[None]:
    """Lift the modes above ``mode`` off its stack for the block, then put them back."""
    above = []
    while length() > 0 and at(length() - 1) is not mode:
        above.append(at(length() - 1))
        pop(None) if pop is torch._C._pop_torch_dispatch_stack else pop()
    try:
        yield
    finally:
        for other in reversed(above):
            push(other)


_PROBE_IDS = itertools.count()
# ops whose output shares its input's storage although the storage is new to the program:
# ``torch.tensor(list)`` reaches the dispatcher only as ``lift_fresh`` of a tensor made outside it
FRESH_OPS: frozenset[str] = frozenset({"lift_fresh", "lift_fresh_copy"})


def _storage_id_or_none(tensor: torch.Tensor) -> int | None:
    try:
        return torch._C._storage_id(tensor)
    except (RuntimeError, NotImplementedError):  # no storage (a sparse or wrapper tensor)
        return None


def _fresh_storage_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the storage a freshly allocated tensor spans (as ``empty_strided`` sizes it)."""
    if tensor.numel() == 0:
        return 0
    last = sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride(), strict=True))
    extent = tensor.storage_offset() + 1 + last
    return extent * tensor.element_size()


class _LiveMode(TorchDispatchMode):
    """Sees every aten op below autograd, so forward, backward and optimizer ops alike."""

    def __init__(self, probe: LiveTensorProbe) -> None:
        super().__init__()
        self._probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self._probe._on_op(str(func.overloadpacket.__name__), out, (args, kwargs))
        return out


class _GraphHookMode(TorchFunctionMode):
    """Sits above autograd, where results already carry their grad_fn, to hook new nodes."""

    def __init__(self, probe: LiveTensorProbe) -> None:
        super().__init__()
        self._probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            self._probe._hook_graph(out)
        return out


class LiveTensorProbe:
    """Peak and timeline of live tensor storages over a block of work, by category.

    ``preexisting`` names the storages alive before the block that count towards the total
    (``{"params": [...], "grads": [...], "optimizer": [...], "inputs": [...]}``). Every storage
    an aten op returns afterwards is added under the current ``phase()`` ("forward",
    "backward", "optimizer", ...), and removed when the storage is freed (``weakref.finalize``).
    The peak is taken after each op and each free, so it is the exact maximum of the sum of
    live storages as the dispatcher sees them.

    In backward the probe counts a storage as alive while a tensor the dispatcher returned
    on it lives. Under ``create_graph=True`` autograd can keep a saved output through an
    alias it makes itself; such a storage may be counted as freed early, so an ``hvp``
    step's peak is a lower figure than a storage-level count would give.

    Cannot see: tensors made before entering that were not listed in ``preexisting``; scratch
    memory that kernels allocate internally without returning it (oneDNN, cuBLAS workspaces);
    allocator rounding and caching (use ``CudaProbe`` for those); the CUDA context.
    """

    def __init__(self, preexisting: Mapping[str, Iterable[torch.Tensor | None]] | None = None,
                 record_timeline: bool = True, device: torch.device | str | None = None,
                 resizable: Mapping[str, Iterable[torch.Tensor]] | None = None) -> None:
        # with ``device``, only storages on that device count: one device's peak when a step
        # spans several (model-parallel)
        self._device = torch.device(device) if device is not None else None
        self._preexisting = {k: [t for t in v if t is not None and self._counts(t.device)]
                             for k, v in (preexisting or {}).items()}
        self._record_timeline = record_timeline
        # storages that grow and shrink in place (``resize_``, which no aten op reports):
        # FSDP's unsharded parameters. Their size is read again after every op.
        self._resizable = [(category, local_tensor(t).untyped_storage())
                           for category, tensors in (resizable or {}).items() for t in tensors
                           if self._counts(t.device)]
        self._resizable_bytes: dict[int, int] = {}  # storage key -> bytes as last read
        self.resizable_peak_bytes = 0  # the most the resizable storages held at once
        self._tracked: dict[int, _Tracked] = {}
        self._by_category: dict[str, int] = {}
        self._live = 0
        self._phase = "outside"
        self._active = False
        self.peak_bytes = 0
        self.peak_by_category: dict[str, int] = {}
        self.peak_op = ""
        self.peak_phase = ""
        self.peak_by_op: dict[str, int] = {}  # filled only with track_ops=True
        self.track_ops = False
        self.peak_tracked: dict[int, _Tracked] = {}  # what was live at the peak (track_ops=True)
        self.module_of: Any = None  # callable() -> the running module's name, for attribution
        self.on_peak: Any = None  # callable() at each new peak
        self._current_op = ""
        self.timeline: list[TimelineEvent] = []
        self.phase_end: dict[str, dict[str, int]] = {}  # the last time each phase ended
        self.phase_ends: list[tuple[str, dict[str, int]]] = []  # every time, in order
        self._mode: _LiveMode | None = None
        self._node_key = f"bpmem-live-{next(_PROBE_IDS)}"  # marks the autograd nodes this probe hooked

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Label the storages created inside the block (and timeline events) with ``name``;
        ``phase_end[name]`` keeps the live bytes by category as the block ends."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self.phase_end[name] = {k: v for k, v in self._by_category.items() if v}
            self.phase_ends.append((name, self.phase_end[name]))
            self._phase = previous

    def _counts(self, device: torch.device) -> bool:
        if self._device is None:
            return True
        # a device without an index ("cuda") takes in all of its type; "cuda:1" only that one
        return device.type == self._device.type and (self._device.index is None or device.index is None
                                                      or device.index == self._device.index)

    def _track(self, storage: torch.UntypedStorage, category: str) -> None:
        key = storage._cdata
        if key in self._tracked or not self._counts(storage.device):
            return
        self._add(key, _Tracked(storage.nbytes(), category, self._current_op, module=self._module()))
        weakref.finalize(storage, self._on_free, key)

    def _module(self) -> str:
        return self.module_of() if self.module_of is not None else ""

    def tracked_now(self, key: int) -> _Tracked | None:
        """The record of the storage now live under ``key`` (None if none is)."""
        return self._tracked.get(key)

    def _add(self, key: int, tracked: _Tracked) -> None:
        self._tracked[key] = tracked
        self._by_category[tracked.category] = self._by_category.get(tracked.category, 0) + tracked.nbytes
        self._live += tracked.nbytes

    def _on_free(self, key: int) -> None:
        tracked = self._tracked.pop(key, None)
        if tracked is None or not self._active:
            return
        self._by_category[tracked.category] -= tracked.nbytes
        self._live -= tracked.nbytes
        self._note("free")

    def _on_op(self, op: str, out: Any, inputs: Any = ()) -> None:
        self._current_op = op
        given = None  # storages of the op's inputs, computed only if an output could alias one
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                leaf = local_tensor(leaf)
                key = _storage_id_or_none(leaf)
                if key is not None and key not in self._tracked and op not in FRESH_OPS:
                    if given is None:
                        given = {_storage_id_or_none(local_tensor(t)) for t in tree_leaves(inputs)
                                 if isinstance(t, torch.Tensor)}
                    if key in given:
                        continue  # a view or in-place result on a storage older than the block: nothing new
                if self._phase == "backward" or torch._C._current_graph_task_id() != -1:
                    self._track_alias(leaf)  # inside autograd's backward, labelled or not
                else:
                    self._track(leaf.untyped_storage(), self._phase)
        self._note(op)

    def _track_alias(self, tensor: torch.Tensor) -> None:
        """Track a storage through the tensors that alias it, never touching the storage.

        Asking a tensor for ``untyped_storage()`` makes a Python object that holds a second
        reference to the storage for as long as the storage lives, and autograd only sums two
        gradients in place when it holds the sole reference. So in backward the probe counts
        a storage as alive while any tensor an op returned on it is alive. Backward ops make
        every alias of a gradient through the dispatcher (detach, t, view, expand), so this is
        exact there; in forward, saved outputs get aliases the dispatcher never sees, which
        is why forward uses storage objects instead.
        """
        if not self._counts(tensor.device):
            return
        key = torch._C._storage_id(tensor)
        tracked = self._tracked.get(key)
        if tracked is None:
            tracked = _Tracked(_fresh_storage_nbytes(tensor), self._phase, self._current_op, aliases=0,
                               module=self._module())
            self._add(key, tracked)
        elif tracked.aliases is None:
            return  # a storage tracked by its storage object already
        tracked.aliases += 1
        weakref.finalize(tensor, self._on_alias_dead, key)

    def _on_alias_dead(self, key: int) -> None:
        tracked = self._tracked.get(key)
        if tracked is not None and tracked.aliases is not None:
            tracked.aliases -= 1
            if tracked.aliases == 0:
                self._on_free(key)

    def _hook_graph(self, out: Any) -> None:
        """Register ``_pause_after_node`` on every autograd node behind ``out`` not yet seen."""
        stack = [leaf.grad_fn for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor)]
        while stack:
            node = stack.pop()
            # A mark in the node's own metadata, not a set of ids: a freed node's id is soon a
            # new node's, which would then go unhooked (several steps in one block).
            if node is None or self._node_key in node.metadata:
                continue
            node.metadata[self._node_key] = True
            # the gradient a node receives may be a sum the engine made while the mode stood
            # aside (two gradients of one tensor that cannot be added in place): see it here
            node.register_prehook(self._see_gradients)
            if not hasattr(node, "variable"):  # AccumulateGrad hands nothing on: no pause
                node.register_hook(self._pause_after_node)
                stack.extend(next_node for next_node, _ in node.next_functions)

    def _see_gradients(self, grad_outputs: Any) -> None:
        if not self._active:
            return
        found = False
        for grad in grad_outputs:
            if isinstance(grad, torch.Tensor) and _storage_id_or_none(local_tensor(grad)) not in self._tracked:
                self._current_op = "add (gradient sum)"
                self._track_alias(local_tensor(grad))
                found = True
        if found:
            self._note("add (gradient sum)")

    def _pause_after_node(self, grad_inputs: Any, grad_outputs: Any) -> None:
        """Step aside while the engine hands this node's outputs to the next nodes.

        Autograd sums two gradients that meet at one input (a weight used by its Linear and by
        the regulariser) in place, unless a dispatch mode is active, in which case it adds out
        of place (``isTensorSubclassLike`` is true under any mode). Watching would then add a
        weight-sized buffer that an unwatched step never allocates. So the mode leaves the stack
        here; the engine restores the thread-local mode stack before it runs the next node.
        """
        # every bpmem live mode on top of the stack steps aside, so nested probes (each hooked
        # on the same nodes) leave the sum in place too; the first hook to run pops them all
        while torch._C._len_torch_dispatch_stack() > 0:
            top = torch._C._get_dispatch_stack_at(torch._C._len_torch_dispatch_stack() - 1)
            if not isinstance(top, _LiveMode):
                break
            torch._C._pop_torch_dispatch_stack(None)

    def _resync_resizable(self) -> None:
        for category, storage in self._resizable:
            now, before = storage.nbytes(), self._resizable_bytes.get(storage._cdata, 0)
            if now != before:
                self._resizable_bytes[storage._cdata] = now
                self._by_category[category] = self._by_category.get(category, 0) + now - before
                self._live += now - before
        self.resizable_peak_bytes = max(self.resizable_peak_bytes, sum(self._resizable_bytes.values()))

    def _note(self, op: str) -> None:
        if self._resizable:
            self._resync_resizable()
        if self._live > self.peak_bytes:
            self.peak_bytes = self._live
            self.peak_by_category = {k: v for k, v in self._by_category.items() if v}
            self.peak_op, self.peak_phase = op, self._phase
            if self.track_ops:
                by_op: dict[str, int] = {}
                for tracked in self._tracked.values():
                    name = tracked.op or tracked.category
                    by_op[name] = by_op.get(name, 0) + tracked.nbytes
                self.peak_by_op = by_op
                self.peak_tracked = dict(self._tracked)
            if self.on_peak is not None:
                self.on_peak()
        if self._record_timeline:
            by_category = {k: v for k, v in self._by_category.items() if v}
            self.timeline.append(TimelineEvent(len(self.timeline), op, self._phase, self._live, by_category))

    @property
    def live_bytes(self) -> int:
        return self._live

    def __enter__(self) -> LiveTensorProbe:
        self._active = True
        for category, tensors in self._preexisting.items():
            for tensor in tensors:
                self._track(local_tensor(tensor).untyped_storage(), category)
        self._preexisting = {}  # hold no references: they would keep freed storages alive
        self._resizable = [(c, st) for c, st in self._resizable if st._cdata not in self._tracked]
        self._note("start")
        self._mode = _LiveMode(self)
        self._graph_mode = _GraphHookMode(self)
        self._graph_mode.__enter__()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._mode is not None
        # a measurement that ends before one it encloses (possible only without `with`) takes
        # its own modes off the stacks and leaves the inner one's in place
        with _on_top(self._mode, torch._C._len_torch_dispatch_stack, torch._C._get_dispatch_stack_at,
                     torch._C._pop_torch_dispatch_stack, torch._C._push_on_torch_dispatch_stack):
            self._mode.__exit__(*exc_info)
        with _on_top(self._graph_mode, torch._C._len_torch_function_stack, torch._C._get_function_stack_at,
                     torch._C._pop_torch_function_stack, torch._C._push_on_torch_function_stack):
            self._graph_mode.__exit__(*exc_info)
        self._active = False
        self._resizable = []  # the storage objects would otherwise outlive the step

    def result(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_by_category": dict(self.peak_by_category),
            "peak_op": self.peak_op,
            "peak_phase": self.peak_phase,
        }


class AllocatorTraceProbe:
    """Peak of the CPU allocator's own stream of allocations and frees (``torch.profiler``
    with ``profile_memory=True``), over ``baseline_bytes`` already live at the start.

    It changes nothing about how the step runs (it is not a dispatch mode), so it can watch
    a ``torch.compile``d step, which dynamo runs eagerly under any dispatch mode. On the
    plain and checkpointed steps its peak equals ``LiveTensorProbe``'s to the byte.

    Cannot see: frees of blocks allocated before it started (so free last step's gradients
    first, and count what is live in ``baseline_bytes``); CUDA memory (use ``CudaProbe``).
    It does see kernels' scratch and the scalars that argument parsing wraps, which the
    dispatcher never returns, so where such a block is live at the peak it reads a little
    higher than ``LiveTensorProbe``.
    """

    def __init__(self, baseline_bytes: int = 0) -> None:
        self.baseline_bytes = baseline_bytes
        self.peak_bytes = baseline_bytes
        self.end_bytes = baseline_bytes
        self._profile: Any = None

    def __enter__(self) -> AllocatorTraceProbe:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._profile.__exit__(*exc_info)
        events = [e for e in self._profile.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = self.baseline_bytes
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()
            self.peak_bytes = max(self.peak_bytes, live)
        self.end_bytes = live
        self._profile = None

    def result(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes}


class CudaProbe:
    """Peaks of the CUDA caching allocator over the block, after a synchronize.

    Resets the peak counters on entry and reads ``max_memory_allocated`` and
    ``max_memory_reserved`` on exit. The figures include allocator rounding (blocks of 512 B,
    2 MiB segments for reserved) and any cuBLAS workspace allocated through the allocator.

    Cannot see: the CUDA context and kernel images (hundreds of MiB outside the allocator),
    NCCL's own buffers, memory other processes hold. Raises RuntimeError without CUDA; tests
    skip with ``CudaProbe.available()``.
    """

    def __init__(self, device: str | torch.device = "cuda") -> None:
        self.device = torch.device(device)
        self.cuda_max_allocated_bytes = 0
        self.cuda_max_reserved_bytes = 0
        self.start_allocated_bytes = 0

    @staticmethod
    def available() -> bool:
        return torch.cuda.is_available()

    def __enter__(self) -> CudaProbe:
        if not self.available():
            raise RuntimeError("CudaProbe needs a CUDA device; torch.cuda.is_available() is False")
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start_allocated_bytes = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc_info: object) -> None:
        torch.cuda.synchronize(self.device)
        self.cuda_max_allocated_bytes = int(torch.cuda.max_memory_allocated(self.device))
        self.cuda_max_reserved_bytes = int(torch.cuda.max_memory_reserved(self.device))

    def result(self) -> dict[str, Any]:
        return {
            "cuda_max_allocated_bytes": self.cuda_max_allocated_bytes,
            "cuda_max_reserved_bytes": self.cuda_max_reserved_bytes,
        }


@dataclass
class RssProbe:
    """Peak resident set size of this process, sampled every ``interval_s`` by psutil.

    Coarse by nature: a spike shorter than the interval is missed, and the figure counts
    everything in the process (the Python heap, torch's libraries, glibc arenas that keep
    freed memory), so it only bounds tensor memory from above.
    """

    interval_s: float = 0.001
    rss_peak_bytes: int = 0
    rss_start_bytes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            self.rss_peak_bytes = max(self.rss_peak_bytes, process.memory_info().rss)
            self.samples += 1
            if self._stop.wait(self.interval_s):
                break
        self.rss_peak_bytes = max(self.rss_peak_bytes, process.memory_info().rss)

    def __enter__(self) -> RssProbe:
        import psutil

        self.rss_start_bytes = self.rss_peak_bytes = psutil.Process().memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="bpmem-rss", daemon=True)
        self._thread.start()
        time.sleep(0)  # let the sampler take its first reading
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[str, Any]:
        return {"rss_peak_bytes": self.rss_peak_bytes}
