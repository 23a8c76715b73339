"""How long the CUDA allocator model takes over 1,000,000 events (the target: under 10 s on 2 cores).

The stream is a training loop's shape: per step, a few hundred allocations of many sizes
(small and large pools, some above 10 MiB) freed in the reverse order, with a share kept
alive across steps, so the pools hold many cached blocks to search. Nothing is asserted on
time here.

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/test_allocator_replay_speed.py --benchmark-columns=min,median
"""

from __future__ import annotations

import random

from bpmem.cuda_allocator.model import CachingAllocator

EVENTS = 1_000_000


def _events(count: int, seed: int = 0) -> list[tuple[str, int]]:
    """(action, size or index) pairs: allocations of sizes from 4 B to 64 MiB, each freed later."""
    draw = random.Random(seed)
    sizes = [draw.choice((4, 1000, 4096, 65_536, 400_000, 2_000_000, 9_000_000, 40_000_000, 64 << 20))
             + draw.randrange(512) for _ in range(512)]
    events: list[tuple[str, int]] = []
    live: list[int] = []
    while len(events) < count:
        for index in range(draw.randrange(100, 400)):
            events.append(("alloc", sizes[(index * 7 + len(events)) % len(sizes)]))
            live.append(len(events) - 1)
        keep = draw.randrange(len(live) // 4 + 1)
        while len(live) > keep:
            events.append(("free", live.pop()))
    return events[:count]


def _replay(events: list[tuple[str, int]]) -> int:
    allocator = CachingAllocator()
    addresses: dict[int, int] = {}
    for position, (action, value) in enumerate(events):
        if action == "alloc":
            addresses[position] = allocator.malloc(value)
        elif value in addresses:
            allocator.free(addresses.pop(value))
    return allocator.stats.max_reserved


def test_replay_a_million_events(benchmark) -> None:
    events = _events(EVENTS)
    reserved = benchmark.pedantic(_replay, args=(events,), rounds=1, warmup_rounds=0)
    assert reserved > 0
