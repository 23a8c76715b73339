"""The allocators' own views: the CPU allocator's trace, CUDA's peak counters, the RSS."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from bpmem.torch_private import allocator_events


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block: kineto writes a line to it at every
    profiler start and stop (``USDT: ... profiler_start``), which a user's terminal must not
    fill with. Only the profiler's own start, stop and discarded warm-up run inside it."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


@contextlib.contextmanager
def allocator_profile(quiet_inside: bool = False) -> Iterator[Any]:
    """``torch.profiler.profile(profile_memory=True)`` on the CPU, started and stopped without
    kineto's lines on stderr (with ``quiet_inside``, the whole block without stderr: a warm-up
    run whose only purpose is to be profiled, where c10 warns of frees it cannot size)."""
    from torch.profiler import ProfilerActivity, profile

    session = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():
        session.__enter__()
    try:
        with _stderr_silenced() if quiet_inside else contextlib.nullcontext():
            yield session
    finally:
        with _stderr_silenced():
            session.__exit__(None, None, None)


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

    def __init__(self, baseline_bytes: int = 0, granularity: int = 1) -> None:
        # granularity 64: every block as the CPU allocator gives it (alloc_cpu aligns to 64 B)
        self.granularity = granularity
        self.baseline_bytes = baseline_bytes
        self.peak_bytes = baseline_bytes
        self.end_bytes = baseline_bytes
        self._profile: Any = None

    def __enter__(self) -> AllocatorTraceProbe:
        self._session = allocator_profile()
        self._profile = self._session.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._session.__exit__(*exc_info)
        live = self.baseline_bytes
        for event in sorted(allocator_events(self._profile), key=lambda e: e.start_ns):
            size = -(-abs(event.nbytes) // self.granularity) * self.granularity
            live += size if event.nbytes > 0 else -size
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
            "cuda_baseline_bytes": self.start_allocated_bytes,
        }


def allocator_block_bytes(tensors: Iterable[torch.Tensor | None], device_type: str = "cuda") -> int:
    """Bytes of the distinct storages behind ``tensors`` that live on ``device_type``, each
    rounded up to the CUDA caching allocator's 512 B block: what they hold of
    ``memory_allocated``."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None and tensor.device.type == device_type:
            storage = tensor.untyped_storage()
            seen.setdefault(storage.data_ptr(), -(-storage.nbytes() // 512) * 512)
    return sum(seen.values())


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
