"""The CUDA caching allocator's constants, its rounding, and ``PYTORCH_CUDA_ALLOC_CONF``.

The constants are ``c10/cuda/CUDACachingAllocator.cpp``'s, as read from PyTorch's main branch in 2026:
every request is rounded up to 512 B; requests up to 1 MiB come from the small pool, whose
segments are 2 MiB; a larger request below 10 MiB takes a 20 MiB segment; one of 10 MiB or
more takes a segment of its own size rounded up to 2 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
MIN_BLOCK = 512  # kMinBlockSize: every block is a multiple of it
SMALL_SIZE = MiB  # kSmallSize: the largest request the small pool serves
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: the small pool's segment
LARGE_BUFFER = 20 * MiB  # kLargeBuffer: the segment of a request between 1 and 10 MiB
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: from here a request gets a segment of its own
ROUND_LARGE = 2 * MiB  # kRoundLarge: that segment is rounded up to 2 MiB
ROUNDUP_INTERVALS = 16  # roundup_power2_divisions: one setting per power of 2 from 1 MiB to 32 GiB
KEYS = ("max_split_size_mb", "roundup_power2_divisions", "garbage_collection_threshold", "expandable_segments")


@dataclass(frozen=True)
class AllocatorConfig:
    """The settings that change where blocks go (``PYTORCH_CUDA_ALLOC_CONF``)."""

    max_split_size: int | None = None  # bytes; blocks this large are never split (None: no limit)
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS  # per interval, 0 or 1: off
    garbage_collection_threshold: float = 0.0  # a fraction of the memory limit; 0: off
    expandable_segments: bool = False

    @classmethod
    def parse(cls, text: str) -> AllocatorConfig:
        """``"expandable_segments:True,max_split_size_mb:128"`` and the like; ValueError names
        the key and what it allows (other keys, such as ``backend``, do not move blocks and are
        accepted and ignored)."""
        fields: dict[str, object] = {}
        for item in _items(text):
            key, _, value = item.partition(":")
            key, value = key.strip(), value.strip()
            if key == "max_split_size_mb":
                mb = _number(key, value, "an integer number of MiB above 20")
                if mb <= LARGE_BUFFER // MiB:
                    raise ValueError(f"alloc-conf: max_split_size_mb {value} is too small; allowed: above 20")
                fields["max_split_size"] = int(mb) * MiB
            elif key == "roundup_power2_divisions":
                fields["roundup_power2_divisions"] = _divisions(value)
            elif key == "garbage_collection_threshold":
                threshold = _number(key, value, "a fraction strictly between 0 and 1")
                if not 0.0 < threshold < 1.0:
                    raise ValueError(f"alloc-conf: garbage_collection_threshold {value}; allowed: a fraction "
                                     "strictly between 0 and 1")
                fields["garbage_collection_threshold"] = threshold
            elif key == "expandable_segments":
                if value not in ("True", "False"):
                    raise ValueError(f"alloc-conf: expandable_segments {value!r}; allowed: True, False")
                fields["expandable_segments"] = value == "True"
            elif not key or not value:
                raise ValueError(f"alloc-conf: {item!r} is not KEY:VALUE; allowed keys: {', '.join(KEYS)}")
        return cls(**fields)  # type: ignore[arg-type]

    def divisions(self, size: int) -> int:
        """The power-of-2 divisions that apply to a request of ``size`` bytes."""
        log_size = size.bit_length() - 1
        start = MiB.bit_length() - 1
        index = min(max(log_size - start, 0), ROUNDUP_INTERVALS - 1)
        return self.roundup_power2_divisions[index]

    def splits(self, size: int) -> bool:
        """Whether a block of ``size`` may be split (it is below ``max_split_size``)."""
        return self.max_split_size is None or size < self.max_split_size


def round_size(size: int, config: AllocatorConfig) -> int:
    """The block size a request of ``size`` bytes asks the pool for."""
    if size < MIN_BLOCK:
        return MIN_BLOCK
    divisions = config.divisions(size)
    if divisions > 1 and size > MIN_BLOCK * divisions:
        return _next_division(size, divisions)
    return -(-size // MIN_BLOCK) * MIN_BLOCK


def allocation_size(size: int) -> int:
    """The segment ``cudaMalloc`` is asked for when no cached block fits a ``size`` block."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


def _next_division(size: int, divisions: int) -> int:
    """Round up to the next of ``divisions`` equal steps between two powers of 2 (1200 B in 4
    divisions between 1024 and 2048 is 1280)."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def _items(text: str) -> list[str]:
    """Split on commas outside brackets (``roundup_power2_divisions:[256:1,>:8]`` is one item)."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [item for item in (*items, current) if item.strip()]


def _number(key: str, value: str, allowed: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"alloc-conf: {key} {value!r} is not a number; allowed: {allowed}") from None


def _divisions(value: str) -> tuple[int, ...]:
    """``4`` (every interval) or ``[256:1,512:2,1024:4,>:8]`` (MiB upper bounds, ``>`` the rest)."""
    allowed = "a power of 2, or [MiB:divisions,...,>:divisions] with MiB powers of 2"
    if not value.startswith("["):
        count = int(_number("roundup_power2_divisions", value, allowed))
        if count & (count - 1):
            raise ValueError(f"alloc-conf: roundup_power2_divisions {value}; allowed: {allowed}")
        return (count,) * ROUNDUP_INTERVALS
    table, last = [0] * ROUNDUP_INTERVALS, 0
    for pair in value.strip("[]").split(","):
        bound, _, count_text = pair.partition(":")
        count = int(_number("roundup_power2_divisions", count_text, allowed))
        if bound.strip() == ">":
            table[last:] = [count] * (ROUNDUP_INTERVALS - last)
            continue
        mib = int(_number("roundup_power2_divisions", bound, allowed))
        if mib <= 0 or mib & (mib - 1):
            raise ValueError(f"alloc-conf: roundup_power2_divisions bound {bound}; allowed: {allowed}")
        index = min(mib.bit_length() - 1, ROUNDUP_INTERVALS - 1)
        table[last:index + 1] = [count] * (index + 1 - last)
        last = index + 1
    return tuple(table)
