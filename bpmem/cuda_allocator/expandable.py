"""``expandable_segments:True``: one segment per pool and stream, mapped in pages as it grows.

The C++ reserves virtual address space for 1 1/8 of the device and maps physical pages
into it (2 MiB for the small pool, 20 MiB for the large), at the lowest address where the
request fits, so the blocks of one stream tile a single segment. ``empty_cache`` (and the
retry after a failed mapping) unmaps the whole pages inside free blocks.
"""

from __future__ import annotations

import bisect
from typing import Any

from bpmem.cuda_allocator.blocks import Block, Pool
from bpmem.cuda_allocator.config import LARGE_BUFFER, SMALL_BUFFER

ADDRESS_SPACE = 1 << 40  # an expandable segment's virtual range where no device size is given


class ExpandableSegments:
    """The part of ``CachingAllocator`` that maps and unmaps pages of expandable segments (it
    uses the allocator's ``_merge``, ``_fits``, ``_reserve``, ``limit`` and ``stats``)."""

    limit: int | None
    stats: Any
    _next_address: int

    def _page(self, pool: Pool) -> int:
        return SMALL_BUFFER if pool.small else LARGE_BUFFER

    def _grow_expandable(self, pool: Pool, size: int, stream: int) -> Block | None:
        candidate = self._expandable_candidate(pool, size, stream)
        if not candidate.mapped and not self._map(candidate, min(candidate.size, size), pool):
            return None
        while candidate.size < size:  # free, then unmapped: map some of the tail and merge
            following = candidate.next
            assert following is not None
            if not self._map(following, min(size - candidate.size, following.size), pool):
                return None
            candidate = following
        pool.remove(candidate)
        return candidate

    def _expandable_candidate(self, pool: Pool, size: int, stream: int) -> Block:
        def free(b: Block | None) -> bool:
            return b is not None and not b.allocated
        for key in pool.unmapped[bisect.bisect_left(pool.unmapped, (stream, -1)):]:
            if key[0] != stream:
                break
            start = pool.unmapped_blocks[key]
            if free(start.prev):
                start = start.prev  # type: ignore[assignment]
            room, current = 0, start
            while room < size and free(current):
                room += current.size  # type: ignore[union-attr]
                current = current.next  # type: ignore[union-attr]
            if room >= size:
                return start
        span = ADDRESS_SPACE if self.limit is None else self.limit + self.limit // 8
        span = -(-span // self._page(pool)) * self._page(pool)
        block = Block(self._next_address, span, stream, pool.small, expandable=True, mapped=False)
        self._next_address += span + SMALL_BUFFER
        pool.insert_unmapped(block)
        return block

    def _segment_start(self, block: Block) -> int:
        while block.prev is not None:
            block = block.prev
        return block.addr

    def _map(self, block: Block, size: int, pool: Pool) -> bool:
        page, start = self._page(pool), self._segment_start(block)
        begin = block.addr
        end = start + -(-(block.addr + size - start) // page) * page
        mapped = min(end, block.addr + block.size) - begin
        if not self._fits(mapped):
            return False
        pool.remove_unmapped(block)
        block.mapped = True
        if mapped < block.size:
            rest = Block(block.addr + mapped, block.size - mapped, block.stream, block.small, True,
                         prev=block, next=block.next, mapped=False)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, mapped
            pool.insert_unmapped(rest)
        self._merge(block, block.prev, pool)
        self._merge(block, block.next, pool)
        pool.insert(block)
        self._reserve(mapped)
        return True

    def _unmap(self, block: Block, pool: Pool) -> None:
        """Give back the whole pages inside a free expandable block."""
        page, start = self._page(pool), self._segment_start(block)
        first = start + -(-(block.addr - start) // page) * page
        last = start + (block.addr + block.size - start) // page * page
        if last <= first:
            return
        pool.remove(block)
        if first > block.addr:
            before = Block(block.addr, first - block.addr, block.stream, block.small, True, prev=block.prev,
                           next=block)
            if block.prev is not None:
                block.prev.next = before
            block.prev = before
            pool.insert(before)
        if last < block.addr + block.size:
            after = Block(last, block.addr + block.size - last, block.stream, block.small, True, prev=block,
                          next=block.next)
            if block.next is not None:
                block.next.prev = after
            block.next = after
            pool.insert(after)
        block.addr, block.size, block.mapped = first, last - first, False
        self._merge(block, block.prev, pool)
        self._merge(block, block.next, pool)
        pool.insert_unmapped(block)
        self.stats.reserved -= last - first
