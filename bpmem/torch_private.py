"""The only bpmem module allowed to touch PyTorch's private API.

Everything fenced here is internal to PyTorch and may change in any release without a
deprecation warning. Keeping every use behind one small function means a torch upgrade is
audited by reading this file and running ``tests/test_torch_private.py``, which exercises
each entry for real on CPU. The same test file fails if any other bpmem module reaches a
private torch name directly.

Checked against torch 2.13.0 (CPU build): 2.13 tested here. bpmem declares torch >= 2.6
and the GPU machines run 2.11; neither has been checked against this list yet.

Private API -> what bpmem needs it for -> fence:

- ``torch._C._storage_id(tensor)``: a storage's identity without creating a Python storage
  object, which would hold an extra reference and stop autograd from summing gradients in
  place -> ``tensor_storage_address``
- ``UntypedStorage._cdata``: the same identity read from a storage object -> ``storage_address``
- ``Tensor._base``: the tensor a view was taken from, so ``W.t()`` counts as the parameter
  ``W`` -> ``view_base``
- ``torch.utils._python_dispatch.is_traceable_wrapper_subclass`` and the
  ``__tensor_flatten__`` protocol: the local tensor inside a DTensor or an
  AsyncCollectiveTensor -> ``wrapper_inner_tensors``
- ``torch.utils._python_dispatch.TorchDispatchMode``: the live-tensor probe's mode -> re-exported
- ``torch.utils._pytree.tree_leaves``: the tensors in an op's arguments and results -> re-exported
- ``torch._C._{len,get,pop,push}..._torch_dispatch_stack`` / ``..._torch_function_stack``:
  a probe steps aside during backward and leaves the stack without disturbing a newer
  mode above it -> ``DISPATCH_MODES``, ``FUNCTION_MODES``
- ``torch._C._current_graph_task_id()``: whether this thread runs a backward -> ``running_backward``
- ``AccumulateGrad.variable`` (undocumented): a node that ends the graph at a leaf -> ``is_accumulate_grad``
- ``profile.profiler.kineto_results.events()`` (``torch._C._autograd``'s ``_KinetoEvent``s): the CPU
  allocator's trace and bpmem's ranges in it -> ``allocator_events``, ``profiled_ranges``
- ``torch._C._stash_obj_in_tls`` / ``_remove_obj_from_tls``: the contextvars context that
  backward stashes, switched off to show that it causes the gloo teardown abort
  (``benchmarks/teardown_abort.py``) -> ``context_stash_disabled``
- ``torch._subclasses.fake_tensor`` (``FakeTensorMode``, ``FakeTensor`` and its data-dependence
  exceptions, ``unset_fake_temporarily``): ``bpmem estimate --model`` runs the step on tensors
  without data, and builds the model outside that mode -> ``fake_tensor_mode``, ``is_fake``,
  ``data_dependent_errors``, ``fake_mode_active``, ``outside_fake_mode``
- ``torch.distributed.fsdp._fully_shard._fully_shard.FSDPModule``,
  ``pipelining.stage._PipelineStageBase``, ``pipelining.schedules._PipelineSchedule``:
  objects that must be gone before the final barrier -> ``distributed_object_types``
- ``DistributedDataParallel._get_ddp_logging_data()["bucket_sizes"]``: DDP's gradient
  buckets, which no probe can see -> ``ddp_bucket_sizes``
- ``torch._functorch.config.activation_memory_budget``: compile-budget's knob -> ``partitioner_memory_budget``
- ``torch._dynamo.backends.common.aot_autograd``,
  ``torch._functorch.partitioners.min_cut_rematerialization_partition``,
  ``torch._inductor.compile_fx.select_decomp_table``: ``aot_eager_decomp_partition``
  rebuilt with our own graph compilers -> ``min_cut_backend``
- ``torch._functorch.aot_autograd.make_boxed_func`` -> ``boxed``
- ``torch._dynamo.reset()`` -> ``reset_compiler_caches``
- ``torch.testing._internal.distributed.fake_pg.FakeStore``: a process group whose
  collectives do not communicate, for one rank's dry run -> ``fake_process_group``
- ``PipelineStage._warmup_forward_vote`` / ``_warmup_backward_result`` (torch >= 2.13): the
  first step's vote on given shapes, answered locally in that dry run -> ``pipeline_stages_static``

The compiler and distributed modules are imported only when their fence is called:
importing bpmem must not pay for dynamo, and some torch builds lack ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

__all__ = [
    "AllocatorEvent",
    "DISPATCH_MODES",
    "FUNCTION_MODES",
    "ModeStack",
    "TorchDispatchMode",
    "allocator_events",
    "profiled_ranges",
    "boxed",
    "context_stash_disabled",
    "ddp_bucket_sizes",
    "distributed_object_types",
    "is_accumulate_grad",
    "min_cut_backend",
    "partitioner_memory_budget",
    "reset_compiler_caches",
    "running_backward",
    "storage_address",
    "tensor_storage_address",
    "tree_leaves",
    "view_base",
    "wrapper_inner_tensors",
]

GraphCompiler = Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]]


# --- storages and views -------------------------------------------------------------------

def tensor_storage_address(tensor: torch.Tensor) -> int:
    """Address of the C++ StorageImpl behind ``tensor``, read without making a storage object.

    Equal to ``storage_address(tensor.untyped_storage())``; bpmem keys one dict by both."""
    return torch._C._storage_id(tensor)


def storage_address(storage: torch.UntypedStorage) -> int:
    """Address of the C++ StorageImpl behind ``storage``: unique while the storage lives, and
    unlike ``data_ptr()`` also distinct for meta storages (whose data pointer is 0)."""
    return storage._cdata


def view_base(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken from (``W.t()`` -> ``W``); ``tensor`` itself if no view."""
    base = tensor._base
    return base if base is not None else tensor


def wrapper_inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """The tensors a traceable wrapper subclass holds (a DTensor's local shard), in the order
    ``__tensor_flatten__`` names them; None for a tensor that wraps nothing."""
    if not is_traceable_wrapper_subclass(tensor):
        return None
    names, _ = tensor.__tensor_flatten__()
    return [t for t in (getattr(tensor, name) for name in names) if isinstance(t, torch.Tensor)]


# --- mode stacks and the autograd engine --------------------------------------------------

@dataclass(frozen=True)
class ModeStack:
    """One of this thread's stacks of Python modes, handled directly.

    ``pop`` and ``push`` skip the mode's ``__exit__``/``__enter__``. That is the point: a probe
    can leave the stack mid-backward (the engine restores it before the next node), or take
    its own mode out from under a newer one and put the newer one back."""

    length: Callable[[], int]
    at: Callable[[int], Any]
    pop: Callable[[], Any]
    push: Callable[[Any], None]

    def top(self) -> Any:
        """The innermost mode, or None on an empty stack."""
        n = self.length()
        return self.at(n - 1) if n > 0 else None

    @contextlib.contextmanager
    def set_aside_while(self, lift: Callable[[Any], bool]) -> Iterator[None]:
        """Take modes off the top of the stack for the block while ``lift(top)`` holds, then
        put them back in their order."""
        lifted = []
        while self.length() > 0 and lift(self.top()):
            lifted.append(self.top())
            self.pop()
        try:
            yield
        finally:
            for other in reversed(lifted):
                self.push(other)

    def lifted_above(self, mode: Any) -> contextlib.AbstractContextManager[None]:
        """Lift the modes above ``mode`` off the stack for the block, then put them back."""
        return self.set_aside_while(lambda top: top is not mode)


DISPATCH_MODES = ModeStack(
    length=lambda: torch._C._len_torch_dispatch_stack(),
    at=lambda index: torch._C._get_dispatch_stack_at(index),
    # no mode key: the innermost mode, the one torch's own ``_pop_mode()`` takes
    pop=lambda: torch._C._pop_torch_dispatch_stack(None),
    push=lambda mode: torch._C._push_on_torch_dispatch_stack(mode),
)
FUNCTION_MODES = ModeStack(
    length=lambda: torch._C._len_torch_function_stack(),
    at=lambda index: torch._C._get_function_stack_at(index),
    pop=lambda: torch._C._pop_torch_function_stack(),
    push=lambda mode: torch._C._push_on_torch_function_stack(mode),
)


def running_backward() -> bool:
    """Whether this thread is executing a node of autograd's backward right now."""
    return torch._C._current_graph_task_id() != -1


def is_accumulate_grad(node: Any) -> bool:
    """Whether an autograd node is an ``AccumulateGrad``, the end of the graph at a leaf
    (it alone carries the leaf as ``variable``)."""
    return hasattr(node, "variable")


# --- profiler ------------------------------------------------------------------------------

class AllocatorEvent(NamedTuple):
    """One allocation (``nbytes`` > 0) or free (``nbytes`` < 0) of the CPU allocator."""
    start_ns: int
    nbytes: int


def allocator_events(profile: torch.profiler.profile) -> list[AllocatorEvent]:
    """The allocator events of a finished ``profile(profile_memory=True)``, in the profiler's
    own order (sort with a stable key: ties in ``start_ns`` keep that order)."""
    return [AllocatorEvent(event.start_ns(), event.nbytes())
            for event in profile.profiler.kineto_results.events() if event.name() == "[memory]"]


def profiled_ranges(profile: torch.profiler.profile, prefix: str) -> list[tuple[str, int, int]]:
    """(name, start_ns, end_ns) of each ``record_function`` range of a finished profile named
    ``prefix``..., on ``allocator_events``' clock, by start."""
    events = profile.profiler.kineto_results.events()
    return sorted(((e.name(), e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
                   if e.name().startswith(prefix)), key=lambda r: r[1])


# --- thread-local state ---------------------------------------------------------------------

@contextlib.contextmanager
def context_stash_disabled() -> Iterator[None]:
    """Inside the block, backward no longer stashes its ``contextvars`` context in the
    thread-local state that collectives started in backward copy into their works."""
    stash, remove = torch._C._stash_obj_in_tls, torch._C._remove_obj_from_tls
    torch._C._stash_obj_in_tls = lambda key, obj: None
    torch._C._remove_obj_from_tls = lambda key: None
    try:
        yield
    finally:
        torch._C._stash_obj_in_tls, torch._C._remove_obj_from_tls = stash, remove


# --- distributed ----------------------------------------------------------------------------

# by module path and class name, so that a class a given torch version lacks is just skipped
_DISTRIBUTED_TYPES: tuple[tuple[str, str], ...] = (
    ("torch.nn.parallel.distributed", "DistributedDataParallel"),
    ("torch.distributed.fsdp._fully_shard._fully_shard", "FSDPModule"),
    ("torch.distributed.pipelining.stage", "_PipelineStageBase"),
    ("torch.distributed.pipelining.schedules", "_PipelineSchedule"),
    ("torch.distributed.tensor", "DTensor"),
)


def distributed_object_types() -> tuple[type, ...]:
    """The classes whose instances hold process-group state or queued collective works
    (DDP, FSDP2 modules, pipeline stages and schedules, DTensors), those this torch has."""
    found = []
    for module_name, class_name in _DISTRIBUTED_TYPES:
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module_name), class_name))
    return tuple(found)


def ddp_bucket_sizes(ddp_module: torch.nn.parallel.DistributedDataParallel) -> list[int]:
    """Bytes of each gradient bucket DDP allocated (in C++, out of the probes' sight).

    DDP rebuilds its buckets after the first step, so read this after one."""
    sizes = ddp_module._get_ddp_logging_data().get("bucket_sizes", "")
    return [int(size) for size in str(sizes).split(",") if size.strip()]


# --- torch.compile --------------------------------------------------------------------------

def partitioner_memory_budget(fraction: float) -> contextlib.AbstractContextManager[Any]:
    """Inside the block, AOTAutograd's min-cut partitioner saves at most ``fraction`` of what
    eager would save for backward, recomputing the rest (1.0: no limit). It acts when a graph
    is compiled, so the first call of a compiled function must run inside the block."""
    import torch._functorch.config as functorch_config

    return functorch_config.patch(activation_memory_budget=fraction)


def min_cut_backend(fw_compiler: GraphCompiler, bw_compiler: GraphCompiler) -> Callable[..., Any]:
    """A ``torch.compile`` backend: ``aot_eager_decomp_partition`` (inductor's decompositions,
    the min-cut partitioner that honours ``partitioner_memory_budget``) with our own graph
    compilers, which must return ``boxed`` callables."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    return aot_autograd(
        fw_compiler=fw_compiler,
        bw_compiler=bw_compiler,
        # a callable: inductor is imported only when dynamo first compiles
        decompositions=lambda: importlib.import_module("torch._inductor.compile_fx").select_decomp_table(),
        partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"),
    )


def boxed(fn: Callable[..., Any]) -> Callable[[list[Any]], Any]:
    """``fn`` taking its arguments as one list, the calling convention AOTAutograd expects."""
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(fn)


def reset_compiler_caches() -> None:
    """Forget every compiled frame, guard and recompile count, so that a new model starts
    from a clean slate."""
    import torch._dynamo

    torch._dynamo.reset()


def fake_tensor_mode() -> contextlib.AbstractContextManager[Any]:
    """``torch._subclasses.fake_tensor.FakeTensorMode``: tensors with a device, a dtype and a
    shape but no data. Ops dispatch as on the device the fake tensors claim, so kernel choices
    (SDPA's CPU flash kernel, for one) are the real device's, and nothing is allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def is_fake(tensor: Any) -> bool:
    """Whether ``tensor`` is a fake tensor (no data: ``.item()`` is impossible)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def fake_mode_active() -> bool:
    """Whether a ``FakeTensorMode`` is on this thread's dispatch stack."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def outside_fake_mode() -> contextlib.AbstractContextManager[Any]:
    """Leave the active ``FakeTensorMode`` for the block: tensors made there are ordinary
    ones (meta tensors, with ``torch.device("meta")``), which ``.to(dtype)`` can convert."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def data_dependent_errors() -> tuple[type[BaseException], ...]:
    """What fake tensors raise when an op's result depends on the data: ``nonzero``, ``.item()``,
    a boolean mask, a branch on a tensor's value."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    errors: list[type[BaseException]] = [DataDependentOutputException, DynamicOutputShapeException]
    try:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
        errors.append(GuardOnDataDependentSymNode)
    except ImportError:  # older torch: the two above cover it
        pass
    return tuple(errors)


@contextlib.contextmanager
def cuda_history(device: Any, snapshot: dict[str, Any], max_entries: int = 1_000_000,
                 frames: bool = True) -> Iterator[None]:
    """Record the CUDA caching allocator's history over the block (``frames=False``: no stack
    frames); ``snapshot`` is filled with ``torch.cuda.memory._snapshot()`` as it ends, and
    recording stops. The one place that calls these private CUDA functions (documented in
    PyTorch's "Understanding CUDA Memory Usage"); ``bpmem.measurement.memory_trace`` writes it."""
    with torch.cuda.device(device):
        torch.cuda.memory._record_memory_history(max_entries=max_entries,
                                                 **({} if frames else {"context": None, "stacks": "python"}))
        try:
            yield
            torch.cuda.synchronize()
            snapshot.update(torch.cuda.memory._snapshot())
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """This process as rank ``rank`` of ``world_size`` in a process group whose collectives
    return at once without communicating (PyTorch's "fake" backend, from its test utilities),
    so one rank's share of a distributed step runs here alone; destroyed on leaving. Tensors
    that a collective would fill keep what they held."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def pipeline_stages_static(stages: list[Any]) -> None:
    """Make ``PipelineStage``s built with ``input_args`` and ``output_args`` take them as given
    in a process group that does not communicate. Since torch 2.13 the schedule's first step
    holds a vote over P2P (``_warmup_forward_vote``, ``_warmup_backward_result``) on whether
    every stage was given its shapes; a receive that never arrives reads 0 ("infer them"),
    so each stage here answers 1 for itself. Before 2.13, given shapes skip inference anyway."""
    import torch

    def agreed(*_: Any, **__: Any) -> torch.Tensor:
        return torch.ones(1, dtype=torch.int32)

    for stage in stages:
        if hasattr(stage, "_warmup_forward_vote"):
            stage._warmup_forward_vote = agreed
            stage._warmup_backward_result = agreed
