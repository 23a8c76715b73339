"""A recorded CUDA memory snapshot replayed through the allocator model.

A snapshot (``torch.cuda.memory._record_memory_history`` then ``_snapshot()``, pickled) holds
the allocator's segments and blocks at the end, and the events recorded before: ``alloc``
and ``free_completed`` with the requested size, ``segment_alloc``/``segment_free`` (and
``segment_map``/``segment_unmap`` with expandable segments). The replay starts from an empty
allocator where the recording covers the process from its start (every segment it ends
with was allocated in it); otherwise from the state the snapshot implies at the first
event: its final segments and blocks, rewound through the events. Each ``cudaMalloc`` the
model makes takes the address the recording's next ``segment_alloc`` gives, so equal sizes
tie the way they did on the device.

The replay agrees with the recording when its segments and blocks at the end are the
snapshot's (address, size, allocated) and every allocation landed where it did.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpmem.cuda_allocator.config import MIN_BLOCK, SMALL_SIZE, AllocatorConfig, allocation_size, round_size
from bpmem.cuda_allocator.model import Block, CachingAllocator, OutOfMemory

ALLOC, FREE, SEGMENT_ALLOC, SEGMENT_FREE = "alloc", "free_completed", "segment_alloc", "segment_free"


@dataclass(frozen=True)
class Replayed:
    """The replay's figures beside the recording's own (bytes)."""

    max_reserved_bytes: int
    max_allocated_bytes: int  # whole blocks, an unsplit rest included
    segment_sizes: tuple[int, ...]  # at the end, by address
    fragmentation_at_peak: float  # (reserved - allocated) / reserved when allocated peaked
    events: int
    from_empty: bool  # the recording covered the process from its start
    recorded: dict[str, Any] = field(default_factory=dict)
    differences: tuple[str, ...] = ()  # where the replay and the recording part (empty: they agree)
    first_failure: dict[str, int] | None = None  # with a memory limit: the first request it cannot serve


def load_snapshot(path: Path) -> dict[str, Any]:
    """The pickled snapshot; ValueError naming the file where it is not one."""
    try:
        with open(path, "rb") as handle:
            snapshot = pickle.load(handle)  # noqa: S301 - the user's own recording, as PyTorch's viewer reads it
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ModuleNotFoundError) as error:
        raise ValueError(f"{path}: not a readable snapshot ({type(error).__name__}); allowed: a pickle from "
                         "torch.cuda.memory._snapshot()") from None
    if not isinstance(snapshot, dict) or "segments" not in snapshot or "device_traces" not in snapshot:
        raise ValueError(f"{path}: no 'segments' and 'device_traces'; allowed: a pickle from "
                         "torch.cuda.memory._snapshot() taken with _record_memory_history on")
    return snapshot


def recorded_config(snapshot: dict[str, Any]) -> str:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` the recording ran under (empty where it says none)."""
    return str(snapshot.get("allocator_settings", {}).get("PYTORCH_CUDA_ALLOC_CONF", "") or "")


def replay(snapshot: dict[str, Any], config: AllocatorConfig | None = None, device: int = 0,
           limit_bytes: int | None = None) -> Replayed:
    """Replay ``device``'s events under ``config`` (the recording's own by default); with
    ``limit_bytes``, stop at the first request the allocator could not serve within it."""
    config = config or AllocatorConfig.parse(recorded_config(snapshot))
    events = [e for e in snapshot["device_traces"][device] if e["action"] in (ALLOC, FREE, SEGMENT_ALLOC,
                                                                              SEGMENT_FREE)]
    segments = [s for s in snapshot["segments"] if s.get("device", device) == device]
    allocated_in_trace = {e["addr"] for e in events if e["action"] == SEGMENT_ALLOC}
    from_empty = all(s["address"] in allocated_in_trace for s in segments) and not any(
        e["action"] == FREE and e["addr"] not in {a["addr"] for a in events if a["action"] == ALLOC} for e in events)
    addresses = [e["addr"] for e in events if e["action"] == SEGMENT_ALLOC]
    model = _Recorded(config, addresses, limit_bytes)
    if not from_empty:
        _start_from(model, config, segments, events)
    start_allocated = model.stats.allocated
    moved = []  # allocations the model placed elsewhere than the device did
    where: dict[int, int] = {}
    failure = None
    for index, event in enumerate(events):
        action, address = event["action"], event["addr"]
        if action == ALLOC:
            try:
                where[address] = model.malloc(event["size"], event.get("stream", 0))
            except OutOfMemory as error:
                failure = {"event": index, "requested_bytes": event["size"], "reserved_bytes": error.reserved,
                           "allocated_bytes": error.allocated}
                break
            if where[address] != address:
                moved.append(address)
        elif action == FREE:
            model.free(where.pop(address, address))
        elif action == SEGMENT_FREE:
            model.release_segment_at(address)
    ends = [(run[0].addr, sum(b.size for b in run)) for run in model.segments()]
    recorded = _recorded_figures(snapshot, segments, events, config, start_allocated)
    differences = [] if failure is None else ["the replay stopped at a request the limit cannot serve"]
    recorded_starts = [s["address"] for s in sorted(segments, key=lambda s: s["address"])]
    if failure is None and ([a for a, _ in ends] != recorded_starts
                            or [size for _, size in ends] != recorded["segment_sizes"]):
        differences.append("the segments at the end differ")
    if failure is None and _blocks(model) != _snapshot_blocks(segments):
        differences.append("the blocks at the end differ")
    if moved:
        differences.append(f"{len(moved)} allocation(s) landed at another address")
    stats = model.stats
    fragmentation = (stats.reserved_at_max_allocated - stats.max_allocated) / stats.reserved_at_max_allocated \
        if stats.reserved_at_max_allocated else 0.0
    return Replayed(stats.max_reserved, stats.max_allocated, tuple(size for _, size in ends), fragmentation,
                    len(events), from_empty, recorded, tuple(differences), failure)


class _Recorded(CachingAllocator):
    """The model, its ``cudaMalloc`` returning the recording's addresses in order."""

    def __init__(self, config: AllocatorConfig, addresses: list[int], limit_bytes: int | None) -> None:
        super().__init__(config, limit_bytes, first_address=max(addresses, default=1 << 32) + (1 << 30))
        self._addresses = list(reversed(addresses))

    def _alloc_segment(self, pool: Any, size: int, stream: int) -> Block | None:
        if self._addresses and not self.config.expandable_segments and self._fits(allocation_size(size)):
            saved, self._next_address = self._next_address, self._addresses.pop()
            block = super()._alloc_segment(pool, size, stream)
            self._next_address = saved
            return block
        return super()._alloc_segment(pool, size, stream)

    def release_segment_at(self, address: int) -> None:
        """An ``empty_cache`` the recording made: free the cached segment at ``address``."""
        for pool in (self.small, self.large):
            for key in list(pool.keys):
                block = pool.blocks[key]
                if block.addr == address and not block.is_split():
                    self._release_segment(block, pool)
                    return


def _start_from(model: CachingAllocator, config: AllocatorConfig, segments: list[dict[str, Any]],
                events: list[dict[str, Any]]) -> None:
    """The allocator as it stood before the first event: the final segments less those the
    events allocated, plus those they freed; live in them, the final allocations rewound."""
    live = {b["address"]: (b["size"], b.get("requested_size", b["size"])) for s in segments for b in s["blocks"]
            if b["state"] == "active_allocated"}
    spans = {s["address"]: (s["total_size"], s["segment_type"] == "small", s.get("stream", 0)) for s in segments}
    for event in reversed(events):
        if event["action"] == ALLOC:
            live.pop(event["addr"], None)
        elif event["action"] == FREE:
            live[event["addr"]] = (round_size(event["size"], config), event["size"])
        elif event["action"] == SEGMENT_ALLOC:
            spans.pop(event["addr"], None)
        elif event["action"] == SEGMENT_FREE:
            spans[event["addr"]] = (event["size"], event["size"] <= 2 * SMALL_SIZE, event.get("stream", 0))
    for start, (total, small, stream) in sorted(spans.items()):
        pool = model.small if small else model.large
        inside = sorted((a, s, r) for a, (s, r) in live.items() if start <= a < start + total)
        chain: list[Block] = []
        cursor = start
        for index, (address, size, requested) in enumerate(inside):
            if address > cursor:
                chain.append(Block(cursor, address - cursor, stream, small))
            end = inside[index + 1][0] if index + 1 < len(inside) else start + total
            gap = end - (address + size)
            threshold = MIN_BLOCK if small or config.expandable_segments else SMALL_SIZE + 1
            if 0 < gap < threshold:  # too small a rest to have been split off: the block holds it
                size += gap
            chain.append(Block(address, size, stream, small, allocated=True, requested=requested))
            cursor = address + size
        if cursor < start + total:
            chain.append(Block(cursor, start + total - cursor, stream, small))
        for before, after in zip(chain, chain[1:], strict=False):
            before.next, after.prev = after, before
        for block in chain:
            if block.allocated:
                model.active[block.addr] = block
                model.stats.allocated += block.size
                model.stats.requested += block.requested
            else:
                pool.insert(block)
        model._reserve(total)
        model.stats.segments += 1
    model.stats.max_allocated = model.stats.allocated
    model.stats.reserved_at_max_allocated = model.stats.reserved


def _blocks(model: CachingAllocator) -> list[tuple[int, int, bool]]:
    return [(b.addr, b.size, b.allocated) for run in model.segments() for b in run]


def _snapshot_blocks(segments: list[dict[str, Any]]) -> list[tuple[int, int, bool]]:
    return [(b["address"], b["size"], b["state"] == "active_allocated")
            for s in sorted(segments, key=lambda s: s["address"]) for b in s["blocks"]]


def _recorded_figures(snapshot: dict[str, Any], segments: list[dict[str, Any]], events: list[dict[str, Any]],
                      config: AllocatorConfig, start_allocated: int) -> dict[str, Any]:
    """The recording's own figures: its segments at the end, the most it reserved (its
    segment events walked from the end), and the most allocated as its events give it (each
    request rounded as the allocator rounds it; an unsplit rest is not in the events)."""
    reserved_end = sum(s["total_size"] for s in segments)
    reserved = reserved_end - sum(e["size"] for e in events if e["action"] == SEGMENT_ALLOC) + \
        sum(e["size"] for e in events if e["action"] == SEGMENT_FREE)
    most_reserved, allocated, most_allocated = reserved, start_allocated, start_allocated
    for event in events:
        if event["action"] == SEGMENT_ALLOC:
            reserved += event["size"]
            most_reserved = max(most_reserved, reserved)
        elif event["action"] == SEGMENT_FREE:
            reserved -= event["size"]
        elif event["action"] == ALLOC:
            allocated += round_size(event["size"], config)
            most_allocated = max(most_allocated, allocated)
        elif event["action"] == FREE:
            allocated -= round_size(event["size"], config)
    return {"max_reserved_bytes": most_reserved, "max_allocated_bytes": most_allocated,
            "segment_sizes": [s["total_size"] for s in sorted(segments, key=lambda s: s["address"])],
            "reserved_bytes_at_end": reserved_end,
            "allocated_bytes_at_end": sum(b["size"] for s in segments for b in s["blocks"]
                                          if b["state"] == "active_allocated"),
            "alloc_conf": recorded_config(snapshot)}
