"""The allocator's blocks and its pools of cached free ones (``Block``, ``BlockPool`` in the C++)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(eq=False)
class Block:
    """A range of one segment: allocated, cached free, or (expandable) not mapped yet."""

    addr: int
    size: int
    stream: int
    small: bool
    expandable: bool = False
    prev: Block | None = None
    next: Block | None = None
    allocated: bool = False
    requested: int = 0
    mapped: bool = True
    gc_base: int = 0

    def key(self) -> tuple[int, int, int]:
        return (self.stream, self.size, self.addr)

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


@dataclass
class Pool:
    """Cached free blocks of one size class, ordered for best fit; unmapped ranges by address."""

    small: bool
    keys: list[tuple[int, int, int]] = field(default_factory=list)
    blocks: dict[tuple[int, int, int], Block] = field(default_factory=dict)
    unmapped: list[tuple[int, int]] = field(default_factory=list)  # (stream, addr)
    unmapped_blocks: dict[tuple[int, int], Block] = field(default_factory=dict)
    searches: int = 0  # get_free_blocks_call_count: the garbage collector's clock

    def insert(self, block: Block) -> None:
        block.gc_base = self.searches
        key = block.key()
        bisect.insort(self.keys, key)
        self.blocks[key] = block

    def remove(self, block: Block) -> None:
        key = block.key()
        del self.keys[bisect.bisect_left(self.keys, key)]
        del self.blocks[key]

    def insert_unmapped(self, block: Block) -> None:
        bisect.insort(self.unmapped, (block.stream, block.addr))
        self.unmapped_blocks[(block.stream, block.addr)] = block

    def remove_unmapped(self, block: Block) -> None:
        key = (block.stream, block.addr)
        del self.unmapped[bisect.bisect_left(self.unmapped, key)]
        del self.unmapped_blocks[key]
