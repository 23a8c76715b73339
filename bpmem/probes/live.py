"""``LiveTensorProbe``: every storage an aten op makes, until it dies: the peak and a timeline."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bpmem.analytic.ledger import Ledger
from bpmem.probes.common import local_tensor
from bpmem.probes.engine_sums import EngineSums, storage_id_or_none
from bpmem.probes.live_modes import GraphHookMode, LiveMode
from bpmem.torch_private import (
    DISPATCH_MODES,
    FUNCTION_MODES,
    is_accumulate_grad,
    is_fake,
    running_backward,
    storage_address,
    tree_leaves,
)

# Bytes a storage occupies: its own size rounded up to a multiple of this. 1 counts tensors as
# they are; 512 is the CUDA caching allocator's block granularity, what max_memory_allocated
# counts (``allocator_blocks``).
BLOCK_GRANULARITY: contextvars.ContextVar[int] = contextvars.ContextVar("bpmem_block_granularity", default=1)
# with a device type here, the live probes count only storages on it (what one allocator sees)
COUNTED_DEVICE_TYPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("bpmem_counted_device", default=None)
CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every block up to a multiple of this


@contextlib.contextmanager
def allocator_blocks(granularity: int, device_type: str | None = None) -> Iterator[None]:
    """Count every storage the live probes see as the allocator's rounded block inside the
    block; with ``device_type``, only storages on that device (Adam's step counters live on
    the CPU beside CUDA parameters, where the CUDA allocator never sees them)."""
    tokens = BLOCK_GRANULARITY.set(granularity), COUNTED_DEVICE_TYPE.set(device_type)
    try:
        yield
    finally:
        BLOCK_GRANULARITY.reset(tokens[0])
        COUNTED_DEVICE_TYPE.reset(tokens[1])


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
    role: str = ""  # what it turned out to be, set later by bpmem.measurement.api: "gradients", "optimizer"


_PROBE_IDS = itertools.count()
# ops whose output shares its input's storage although the storage is new to the program:
# ``torch.tensor(list)`` reaches the dispatcher only as ``lift_fresh`` of a tensor made outside it
FRESH_OPS: frozenset[str] = frozenset({"lift_fresh", "lift_fresh_copy"})


def _fresh_storage_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the storage a freshly allocated tensor spans (as ``empty_strided`` sizes it)."""
    if tensor.numel() == 0:
        return 0
    last = sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride(), strict=True))
    extent = tensor.storage_offset() + 1 + last
    return extent * tensor.element_size()


class LiveTensorProbe(EngineSums):
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
                 resizable: Mapping[str, Iterable[torch.Tensor]] | None = None, hook_graphs: bool = True) -> None:
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
        # the same ledger the analytic replay keeps: totals by category, the peak, and (with
        # record_timeline) one Event per op, comparable with the predicted timeline
        self.ledger = Ledger()
        self._active = False
        self.peak_by_op: dict[str, int] = {}  # filled only with track_ops=True
        self.track_ops = False
        self.peak_tracked: dict[int, _Tracked] = {}  # what was live at the peak (track_ops=True)
        self.module_of: Any = None  # callable() -> the running module's name, for attribution
        self.on_peak: Any = None  # callable() at each new peak
        # callable(op) -> a context manager around each op and its accounting (AllocatorViewProbe)
        self.op_bracket: Any = None
        self._current_op = ""
        self.timeline: list[TimelineEvent] = []
        self.phase_end: dict[str, dict[str, int]] = {}  # the last time each phase ended
        self.phase_ends: list[tuple[str, dict[str, int]]] = []  # every time, in order
        self._mode: LiveMode | None = None
        # a forward without autograd has no graph to hook, and a function mode on the stack
        # turns PyTorch's eval fast paths off (TransformerEncoder asks has_torch_function)
        self._hook_graphs = hook_graphs
        self._graph_mode: GraphHookMode | None = None
        self._node_key = f"bpmem-live-{next(_PROBE_IDS)}"  # marks the autograd nodes this probe hooked
        EngineSums.__init__(self)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Label the storages created inside the block (and timeline events) with ``name``;
        ``phase_end[name]`` keeps the live bytes by category as the block ends."""
        previous, self.ledger.phase = self.ledger.phase, name
        try:
            yield
        finally:
            self.phase_end[name] = self.ledger.nonzero_categories()
            self.phase_ends.append((name, self.phase_end[name]))
            self.ledger.phase = previous

    def _counts(self, device: torch.device) -> bool:
        counted_type = COUNTED_DEVICE_TYPE.get()
        if counted_type is not None and device.type != counted_type:
            return False
        if self._device is None:
            return True
        # a device without an index ("cuda") takes in all of its type; "cuda:1" only that one
        return device.type == self._device.type and (self._device.index is None or device.index is None
                                                      or device.index == self._device.index)

    def _track(self, tensor: torch.Tensor, category: str) -> None:
        # the tensor's device, not its storage's: a fake tensor's storage is on "meta"
        storage = tensor.untyped_storage()
        key = storage_address(storage)
        if key in self._tracked or not self._counts(tensor.device):
            return
        self._add(key, _Tracked(storage.nbytes(), category, self._current_op, module=self._module()))
        weakref.finalize(storage, self._on_free, key)

    def _module(self) -> str:
        return self.module_of() if self.module_of is not None else ""

    def tracked_now(self, key: int) -> _Tracked | None:
        """The record of the storage now live under ``key`` (None if none is)."""
        return self._tracked.get(key)

    def _add(self, key: int, tracked: _Tracked) -> None:
        granularity = BLOCK_GRANULARITY.get()
        tracked.nbytes = -(-tracked.nbytes // granularity) * granularity  # an allocator's block: rounded up
        self._tracked[key] = tracked
        self.ledger.alloc(key, tracked.nbytes, tracked.category, record=False, op=tracked.op)

    def _on_free(self, key: int) -> None:
        self._release(key)
        tracked = self._tracked.pop(key, None)
        if tracked is None or not self._active:
            return
        self.ledger.free(key, record=False)
        self._note("free")

    def _on_op(self, op: str, out: Any, inputs: Any = ()) -> None:
        self._current_op = op
        if self._engine_sums and op == "add" and running_backward() and self._as_real_sum(out, inputs[0]):
            return
        given = None  # storages of the op's inputs, computed only if an output could alias one
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                leaf = local_tensor(leaf)
                key = self._key(leaf)
                if key is not None and key not in self._tracked and op not in FRESH_OPS:
                    if given is None:
                        given = {storage_id_or_none(local_tensor(t)) for t in tree_leaves(inputs)
                                 if isinstance(t, torch.Tensor)}
                    if key in given:
                        continue  # a view or in-place result on a storage older than the block: nothing new
                if self.ledger.phase == "backward" or running_backward():
                    self._track_alias(leaf)  # inside autograd's backward, labelled or not
                else:
                    self._track(leaf, self.ledger.phase)
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
        key = self._key(tensor)
        tracked = self._tracked.get(key)
        if tracked is None:
            tracked = _Tracked(_fresh_storage_nbytes(tensor), self.ledger.phase, self._current_op, aliases=0,
                               module=self._module())
            self._add(key, tracked)
        elif tracked.aliases is None:
            return  # a storage tracked by its storage object already
        tracked.aliases += 1
        self._watch_alias(tensor, key)

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
            node.register_prehook(functools.partial(self._see_gradients, self._number(node)))
            if not is_accumulate_grad(node):  # an AccumulateGrad hands nothing on: no pause
                node.register_hook(functools.partial(self._pause_after_node, self._edges(node)))
                stack.extend(next_node for next_node, _ in node.next_functions)

    def _see_gradients(self, number: int, grad_outputs: Any) -> None:
        self._node_starts(number)
        if not self._active:
            return
        found = False
        for grad in grad_outputs:
            if isinstance(grad, torch.Tensor) and self._key(local_tensor(grad)) not in self._tracked:
                self._current_op = "add (gradient sum)"
                self._track_alias(local_tensor(grad))
                found = True
        if found:
            self._note("add (gradient sum)")

    def _pause_after_node(self, edges: tuple[Any, ...], grad_inputs: Any, grad_outputs: Any) -> None:
        """Step aside while the engine hands this node's outputs to the next nodes, if it
        will sum one of them in place.

        Autograd sums two gradients that meet at one input (a weight used by its Linear and by
        the regulariser) in place where it can (``bpmem.probes.engine_sums``), unless a
        dispatch mode is active, in which case it adds out of place (``isTensorSubclassLike``
        is true under any mode). Watching would then add a weight-sized buffer that an
        unwatched step never allocates. So the mode leaves the stack here; the engine restores
        the thread-local mode stack before it runs the next node. Where every sum will be out
        of place anyway, the mode stays and sees each sum when it is made, beside its inputs.
        """
        in_place, out_of_place = self._coming_sums(edges, grad_inputs)
        if not in_place or torch.is_grad_enabled():
            return
        if out_of_place or any(is_fake(g) for g in grad_inputs):
            # watch every sum, and count those a real engine makes in place as in place (fake
            # tensors sum out of place regardless; an out-of-place sum is seen beside its inputs)
            self._engine_sums = True
            return
        # every bpmem live mode on top of the stack steps aside, so nested probes (each hooked
        # on the same nodes) leave the sum in place too; the first hook to run pops them all
        while isinstance(DISPATCH_MODES.top(), LiveMode):
            DISPATCH_MODES.pop()

    def _resync_resizable(self) -> None:
        for category, storage in self._resizable:
            key = storage_address(storage)
            now, before = storage.nbytes(), self._resizable_bytes.get(key, 0)
            if now != before:
                self._resizable_bytes[key] = now
                self.ledger.resize(("resizable", key), now, category)
        self.resizable_peak_bytes = max(self.resizable_peak_bytes, sum(self._resizable_bytes.values()))

    def _note(self, op: str) -> None:
        if self._resizable:
            self._resync_resizable()
        peak_before = self.ledger.peak
        self.ledger.note(op, record=self._record_timeline)
        if self.ledger.peak > peak_before:
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
            self.timeline.append(TimelineEvent(len(self.timeline), op, self.ledger.phase, self.ledger.total,
                                               self.ledger.nonzero_categories()))

    @property
    def live_bytes(self) -> int:
        return self.ledger.total

    # the peak and where it fell, as the ledger recorded them
    peak_bytes = property(lambda self: self.ledger.peak, doc="the most live bytes at once")
    peak_by_category = property(lambda self: self.ledger.peak_by_category, doc="live bytes by category then")
    peak_op = property(lambda self: self.ledger.peak_op, doc="the op after which the peak was reached")
    peak_phase = property(lambda self: self.ledger.peak_phase, doc="the phase it was reached in")

    def __enter__(self) -> LiveTensorProbe:
        self._active = True
        for category, tensors in self._preexisting.items():
            for tensor in tensors:
                self._track(local_tensor(tensor), category)
        self._preexisting = {}  # hold no references: they would keep freed storages alive
        self._resizable = [(c, st) for c, st in self._resizable if storage_address(st) not in self._tracked]
        self._note("start")
        self._mode = LiveMode(self)
        if self._hook_graphs:
            self._graph_mode = GraphHookMode(self)
            self._graph_mode.__enter__()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._mode is not None
        # a measurement that ends before one it encloses (possible only without `with`) takes
        # its own modes off the stacks and leaves the inner one's in place
        with DISPATCH_MODES.lifted_above(self._mode):
            self._mode.__exit__(*exc_info)
        if self._graph_mode is not None:
            with FUNCTION_MODES.lifted_above(self._graph_mode):
                self._graph_mode.__exit__(*exc_info)
            self._graph_mode = None
        self._active = False
        self._resizable = []  # the storage objects would otherwise outlive the step

    def result(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_by_category": dict(self.peak_by_category),
            "peak_op": self.peak_op,
            "peak_phase": self.peak_phase,
        }
