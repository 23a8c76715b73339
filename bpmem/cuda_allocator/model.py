"""PyTorch's CUDA caching allocator, event by event (``c10/cuda/CUDACachingAllocator.cpp``).

What is modelled, as the C++ does it:

* two pools of cached free blocks, small (requests up to 1 MiB) and large, each ordered by
  (stream, size, address), so ``bisect`` finds the best fit: the smallest block that holds
  the request, the lowest address among equals;
* a found block is split when the rest is worth keeping: at least 512 B in the small pool
  (and with expandable segments), more than 1 MiB in the large one and only below
  ``max_split_size``; an unsplit rest stays in the block and counts as allocated;
* a freed block merges with free neighbours of its segment;
* no cached block fits: ``cudaMalloc`` of ``allocation_size`` (2 MiB, 20 MiB, or the request
  rounded to 2 MiB); if that would pass the memory limit, free cached oversize blocks and
  retry, then free every unsplit cached segment and retry, then fail (``OutOfMemory``);
* ``garbage_collection_threshold`` (with a memory limit, as ``set_per_process_memory_fraction``
  gives): before a ``cudaMalloc`` above the threshold, free unsplit cached large blocks
  older than the average, by how many block searches ago they were cached;
* ``expandable_segments``: one segment per pool and stream whose address space is mapped in
  pages (2 MiB small, 20 MiB large) as it grows, best fit counting a block's unmapped tail.

Not modelled: CUDA graph private pools, cross-stream uses (``record_stream`` events), IPC.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from bpmem.cuda_allocator.blocks import Block, Pool
from bpmem.cuda_allocator.config import (
    LARGE_BUFFER,
    MIN_BLOCK,
    SMALL_BUFFER,
    SMALL_SIZE,
    AllocatorConfig,
    allocation_size,
    round_size,
)
from bpmem.cuda_allocator.expandable import ExpandableSegments


class OutOfMemory(Exception):
    """A request that no cached block, no freed cache and no ``cudaMalloc`` within the limit can serve."""

    def __init__(self, size: int, reserved: int, allocated: int) -> None:
        super().__init__(f"cannot allocate {size:,} B with {reserved:,} B reserved and {allocated:,} B allocated")
        self.size, self.reserved, self.allocated = size, reserved, allocated


@dataclass
class Stats:
    """Current and peak bytes, counted as the allocator counts them (whole blocks)."""

    allocated: int = 0
    reserved: int = 0
    requested: int = 0
    max_allocated: int = 0
    max_reserved: int = 0
    reserved_at_max_allocated: int = 0
    segments: int = 0


class CachingAllocator(ExpandableSegments):
    """``malloc(size, stream)`` gives an address, ``free(address)`` returns it to the cache.

    ``limit_bytes`` is what the allocator may reserve in all (a device's free memory, or
    ``set_per_process_memory_fraction``'s share of it); None for no limit."""

    def __init__(self, config: AllocatorConfig | None = None, limit_bytes: int | None = None,
                 first_address: int = 1 << 32) -> None:
        self.config = config or AllocatorConfig()
        self.limit = limit_bytes
        self.small, self.large = Pool(True), Pool(False)
        self.active: dict[int, Block] = {}
        self.stats = Stats()
        self._next_address = first_address
        self._expandable_segments: list[Block] = []  # each segment's first block (mapped or not)

    # ---- the public calls -------------------------------------------------------------

    def malloc(self, size: int, stream: int = 0) -> int:
        """Allocate ``size`` requested bytes on ``stream``; the block's address."""
        rounded = round_size(size, self.config)
        pool = self.small if rounded <= SMALL_SIZE else self.large
        block = self._get_free_block(pool, rounded, stream)
        if block is None:
            if self.config.garbage_collection_threshold > 0 and self.limit is not None:
                self._collect_garbage()
            block = (self._alloc_segment(pool, rounded, stream)
                     or (self._release_oversize(pool, rounded, stream) and self._alloc_segment(pool, rounded, stream))
                     or (self.release_cached() and self._alloc_segment(pool, rounded, stream)))
        if block is None:
            raise OutOfMemory(rounded, self.stats.reserved, self.stats.allocated)
        return self._hand_out(block, pool, rounded, size)

    def free(self, address: int) -> None:
        """Return the allocated block at ``address`` to its pool, merged with free neighbours."""
        block = self.active.pop(address)
        block.allocated = False
        self.stats.allocated -= block.size
        self.stats.requested -= block.requested
        pool = self.small if block.small else self.large
        for neighbour in (block.prev, block.next):
            self._merge(block, neighbour, pool)
        pool.insert(block)

    def release_cached(self) -> bool:
        """``torch.cuda.empty_cache()``: free every cached segment that holds no allocation."""
        for pool in (self.large, self.small):
            to_unmap = []
            for key in list(pool.keys):
                block = pool.blocks.get(key)
                if block is None:
                    continue
                if block.expandable:
                    to_unmap.append(block)
                elif not block.is_split():
                    self._release_segment(block, pool)
            for block in to_unmap:
                self._unmap(block, pool)
        return True

    def segments(self) -> list[list[Block]]:
        """Every segment's blocks in address order (an expandable one: each mapped run)."""
        heads = {id(b): b for b in [*self.active.values(), *self.small.blocks.values(), *self.large.blocks.values()]}
        runs = []
        for block in heads.values():
            if block.prev is not None and block.prev.mapped:
                continue
            run, current = [], block
            while current is not None and current.mapped:
                run.append(current)
                current = current.next
            runs.append(run)
        return sorted(runs, key=lambda run: run[0].addr)

    # ---- finding and handing out a block ------------------------------------------------

    def _get_free_block(self, pool: Pool, size: int, stream: int) -> Block | None:
        if self.config.garbage_collection_threshold > 0 and self.limit is not None:
            pool.searches += 1
        at = bisect.bisect_left(pool.keys, (stream, size, -1))
        if at == len(pool.keys) or pool.keys[at][0] != stream:
            return None
        block = pool.blocks[pool.keys[at]]
        if block.expandable:  # best fit counts the unmapped tail an expandable block can grow into
            def reach(b: Block) -> int:
                return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)
            while block.expandable and at + 1 < len(pool.keys) and pool.keys[at + 1][0] == stream \
                    and reach(pool.blocks[pool.keys[at + 1]]) < reach(block):
                at += 1
                block = pool.blocks[pool.keys[at]]
        limit = self.config.max_split_size
        if limit is not None and size < limit <= block.size:
            return None  # an oversize block is not cut for a smaller request
        if limit is not None and size >= limit and block.size >= size + LARGE_BUFFER:
            return None  # nor handed whole to one more than 20 MiB smaller
        pool.remove(block)
        return block

    def _should_split(self, block: Block, size: int) -> bool:
        remaining = block.size - size
        if block.small or self.config.expandable_segments:
            return remaining >= MIN_BLOCK
        return self.config.splits(size) and remaining > SMALL_SIZE

    def _hand_out(self, block: Block, pool: Pool, size: int, requested: int) -> int:
        if self._should_split(block, size):
            rest = Block(block.addr + size, block.size - size, block.stream, block.small, block.expandable,
                         prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            pool.insert(rest)
        block.allocated, block.requested = True, requested
        self.active[block.addr] = block
        stats = self.stats
        stats.allocated += block.size
        stats.requested += requested
        if stats.allocated > stats.max_allocated:
            stats.max_allocated, stats.reserved_at_max_allocated = stats.allocated, stats.reserved
        return block.addr

    def _merge(self, block: Block, neighbour: Block | None, pool: Pool) -> None:
        if neighbour is None or neighbour.allocated or neighbour.mapped != block.mapped:
            return
        if neighbour.mapped:
            pool.remove(neighbour)
        else:
            pool.remove_unmapped(neighbour)
        if neighbour is block.prev:
            block.addr, block.prev = neighbour.addr, neighbour.prev
            if block.prev is not None:
                block.prev.next = block
        else:
            block.next = neighbour.next
            if block.next is not None:
                block.next.prev = block
        block.size += neighbour.size

    # ---- segments ----------------------------------------------------------------------

    def _fits(self, size: int) -> bool:
        return self.limit is None or self.stats.reserved + size <= self.limit

    def _reserve(self, size: int) -> None:
        self.stats.reserved += size
        self.stats.max_reserved = max(self.stats.max_reserved, self.stats.reserved)

    def _alloc_segment(self, pool: Pool, size: int, stream: int) -> Block | None:
        if self.config.expandable_segments:
            return self._grow_expandable(pool, size, stream)
        segment = allocation_size(size)
        if not self._fits(segment):
            return None
        address = self._next_address
        self._next_address += segment + SMALL_BUFFER  # never adjacent: segments do not merge
        self._reserve(segment)
        self.stats.segments += 1
        return Block(address, segment, stream, pool.small)

    def _release_segment(self, block: Block, pool: Pool) -> None:
        pool.remove(block)
        self.stats.reserved -= block.size
        self.stats.segments -= 1

    def _release_oversize(self, pool: Pool, size: int, stream: int) -> bool:
        """Free cached blocks of ``max_split_size`` or more: one large enough, else the largest
        ones until as much is free (``release_available_cached_blocks``)."""
        limit = self.config.max_split_size
        if limit is None:
            return False
        wanted = max(size, limit)
        at = bisect.bisect_left(pool.keys, (stream, wanted, -1))
        if at < len(pool.keys) and pool.keys[at][0] == stream:
            self._release_segment(pool.blocks[pool.keys[at]], pool)
            return True
        released, at = 0, at - 1
        while released < wanted and at >= 0 and pool.keys[at][0] == stream and pool.keys[at][1] >= limit:
            block = pool.blocks[pool.keys[at]]
            released += block.size
            self._release_segment(block, pool)
            at -= 1
        return released >= wanted

    def _collect_garbage(self) -> None:
        assert self.limit is not None
        threshold = int(self.config.garbage_collection_threshold * self.limit)
        if self.stats.reserved <= threshold:
            return
        target, reclaimed = self.stats.reserved - threshold, 0
        pool = self.large
        candidates = [pool.blocks[k] for k in pool.keys if not pool.blocks[k].is_split()]
        while reclaimed < target and candidates:
            average = sum(pool.searches - b.gc_base for b in candidates) / len(candidates)
            old = [b for b in candidates if pool.searches - b.gc_base >= average]
            if not old:
                break
            for block in old:
                reclaimed += block.size
                self._release_segment(block, pool)
            candidates = [b for b in candidates if b not in old]
