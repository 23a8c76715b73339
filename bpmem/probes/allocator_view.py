"""``AllocatorViewProbe``: what the CPU allocator hands out over a step, beside the tensors.

A step's tensors are not all the memory it takes: a kernel may allocate scratch inside itself
and free it before it returns (oneDNN's reordered weights and blocked outputs, an RNN's
gates, the nested tensors of ``TransformerEncoder``'s eval fast path), and each block the
CPU allocator gives is a multiple of 64 B (``alloc_cpu`` aligns every request so). This probe
runs the ``LiveTensorProbe`` and the allocator's own trace (``torch.profiler`` with
``profile_memory=True``) over the same step, marks each aten op's span in that trace, and
so knows, op by op:

* ``tensor_bytes``: the live storages, each as its 64 B block, just after the op returned;
* ``allocator_bytes``: the most the allocator held at any moment while the op ran.

Their difference is the op's *excess*: scratch, plus the scalars that argument parsing wraps
as 0-dim tensors (one block each, for the op that takes them). The step's
``allocator_peak_bytes`` is the allocator's highest total (the resident storages as blocks,
plus the trace); its ``scratch_bytes`` is that peak less the tensors' blocks live at that op.

Cannot see: CUDA (``CudaProbe``); memory from outside the allocator (glibc's own arenas, the
Python heap); frees of blocks allocated before the probe started, unless they are in
``preexisting``.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bpmem.probes.allocator import allocator_profile
from bpmem.probes.live import LiveTensorProbe, allocator_blocks
from bpmem.torch_private import allocator_events, profiled_ranges

CPU_BLOCK_BYTES = 64  # c10's alloc_cpu aligns every allocation to 64 B: its unit of memory
RANGE_PREFIX = "bpmem#"  # the record_function ranges this probe marks, one per aten op


def blocks(nbytes: int, granularity: int = CPU_BLOCK_BYTES) -> int:
    """``nbytes`` as the allocator's blocks: rounded away from zero to ``granularity``."""
    sign = -1 if nbytes < 0 else 1
    return sign * (-(-abs(nbytes) // granularity) * granularity)


@dataclass(frozen=True)
class OpExcess:
    """One aten op of a step as the allocator saw it (bytes, in 64 B blocks)."""

    index: int  # its place among the step's aten ops, as the live probe counts them
    op: str
    tensor_bytes: int  # live storages just after it returned
    allocator_bytes: int  # the allocator's most while it ran (at least what it held as it began)

    @property
    def excess_bytes(self) -> int:
        """What the allocator held above the tensors: the op's scratch and wrapped scalars."""
        return max(0, self.allocator_bytes - self.tensor_bytes)


@dataclass(frozen=True)
class AllocatorView:
    """One step's allocator figures (bytes)."""

    allocator_peak_bytes: int  # the allocator's highest total, resident blocks included
    tensor_peak_blocks: int  # the live probe's peak with every storage as its block
    scratch_bytes: int  # allocator_peak_bytes less the tensors' blocks at the op where it fell
    scratch_op: str  # that op ("" if the peak fell where no op ran)
    ops: tuple[OpExcess, ...]


class AllocatorViewProbe:
    """Run a step under it: ``view`` then holds its ``AllocatorView``; ``live`` is the
    ``LiveTensorProbe`` that ran beside the trace (its figures in 64 B blocks)."""

    def __init__(self, preexisting: Mapping[str, Iterable[torch.Tensor | None]], trace: bool = True,
                 hook_graphs: bool = True) -> None:
        self._hook_graphs = hook_graphs  # False for a forward without autograd (LiveTensorProbe)
        # trace=False: the ops and their tensors' blocks alone (a dry run on fake tensors,
        # which allocate nothing), every allocator_bytes then equal to tensor_bytes
        self._trace = trace
        self._preexisting = preexisting
        self._ops: list[tuple[str, int]] = []  # (op, live tensor blocks after it), in order
        self.live: LiveTensorProbe | None = None
        self.view: AllocatorView | None = None
        self._stack: contextlib.ExitStack | None = None
        self._profile: Any = None

    @contextlib.contextmanager
    def _bracket(self, op: str) -> Iterator[None]:
        index = len(self._ops)
        with (torch.autograd.profiler.record_function(f"{RANGE_PREFIX}{index}") if self._trace
              else contextlib.nullcontext()):
            yield
        assert self.live is not None
        self._ops.append((op, self.live.live_bytes))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """The live probe's phase labels, so a step that takes ``phase=`` runs under it."""
        assert self.live is not None
        with self.live.phase(name):
            yield

    def __enter__(self) -> AllocatorViewProbe:
        stack = contextlib.ExitStack()
        stack.enter_context(allocator_blocks(CPU_BLOCK_BYTES, "cpu"))
        self.live = LiveTensorProbe(self._preexisting, record_timeline=False, hook_graphs=self._hook_graphs)
        self._preexisting = {}  # hold no references past the start
        self.live.op_bracket = self._bracket
        if self._trace:
            self._profile = stack.enter_context(allocator_profile())
        stack.enter_context(self.live)
        self._baseline = self.live.live_bytes
        self._stack = stack
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._stack is not None and self.live is not None
        self._stack.__exit__(*exc_info)
        self.live.op_bracket = None
        if exc_info[0] is None and self._trace:
            self.view = _read_view(self._profile, self._baseline, self._ops, self.live.peak_bytes)
        elif exc_info[0] is None:
            self.view = AllocatorView(self.live.peak_bytes, self.live.peak_bytes, 0, "",
                                      tuple(OpExcess(i, op, b, b) for i, (op, b) in enumerate(self._ops)))
        self._profile = None


def _read_view(profile: Any, baseline: int, ops: list[tuple[str, int]], tensor_peak: int) -> AllocatorView:
    """Walk the trace in order: each allocation and free, as blocks, is charged to the op
    whose span holds it (or, between ops, to the next op, which is what it was made for)."""
    ranges = profiled_ranges(profile, RANGE_PREFIX)
    starts = [start for _, start, _ in ranges]
    index_of = [int(name.removeprefix(RANGE_PREFIX)) for name, _, _ in ranges]
    most = [0] * len(ops)  # per op: the allocator's most while it ran
    live = peak = baseline
    peak_op = -1
    events = sorted(allocator_events(profile), key=lambda e: e.start_ns)
    cursor = 0  # ranges before this one have begun
    for event in events:
        # the ops that began before this event, with nothing allocated inside, held ``live``
        while cursor < len(ranges) and starts[cursor] <= event.start_ns:
            _raise(most, index_of[cursor], live)
            cursor += 1
        live += blocks(event.nbytes)
        at = bisect.bisect_right(starts, event.start_ns) - 1
        inside = at >= 0 and event.start_ns <= ranges[at][2]
        op = index_of[at] if inside else (index_of[cursor] if cursor < len(ranges) else -1)
        if op >= 0:
            _raise(most, op, live)
        if live > peak:
            peak, peak_op = live, op
    for position in range(cursor, len(ranges)):
        _raise(most, index_of[position], live)
    records = tuple(OpExcess(i, name, tensor_bytes, max(most[i], tensor_bytes))
                    for i, (name, tensor_bytes) in enumerate(ops))
    tensors_then = records[peak_op].tensor_bytes if 0 <= peak_op < len(records) else tensor_peak
    return AllocatorView(allocator_peak_bytes=peak, tensor_peak_blocks=tensor_peak,
                         scratch_bytes=max(0, peak - tensors_then),
                         scratch_op=records[peak_op].op if 0 <= peak_op < len(records) else "", ops=records)


def _raise(most: list[int], index: int, live: int) -> None:
    if 0 <= index < len(most):
        most[index] = max(most[index], live)
