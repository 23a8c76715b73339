"""Step times that can be trusted, and a judgement of when they cannot.

Memory is counted exactly; time is measured, and a measurement on a shared machine is noisy.
So bpmem:

- pins the number of intra-op threads for a whole sweep and records it in every row
  (``threads``): a step timed with 2 threads is not comparable with one timed with 16;
- warms up until the step time settles (``time_calls``): at least ``warmup`` untimed steps,
  then more, up to ``MAX_EXTRA_WARMUP``, until two in a row differ by less than
  ``SETTLED_WITHIN`` (allocator caches, oneDNN's kernel choice and CPU frequency settle over
  the first steps);
- keeps the median and the interquartile range of ``repeats`` timed steps (``time_summary``);
- calls a comparison noisy (``overhead``) when the two cells' spreads are large against the
  difference between them: the report then says "within noise" instead of an overhead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

SETTLED_WITHIN = 0.10  # two warm-up steps within 10% of each other: the time has settled
MAX_EXTRA_WARMUP = 10  # at most this many warm-up steps beyond the ones asked for
NOISY_SPREAD = 0.25  # an IQR above a quarter of the median: the cell's own time is noisy


def pin_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count for this process (``None`` keeps torch's default)
    and return the count that steps will run with."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def time_calls(run: Callable[[], Any], warmup: int, repeats: int, devices: Iterable[Any] = ()) -> list[float]:
    """Seconds per call of ``run()``: untimed warm-up calls until the time settles (at least
    ``warmup`` of them), then ``repeats`` timed ones (at least one). Each call is bracketed by
    ``torch.cuda.synchronize`` on every CUDA device among ``devices``, so the clock sees the
    kernels, not just their launch."""
    import torch

    cuda = [d for d in dict.fromkeys(torch.device(d) for d in devices) if d.type == "cuda"]

    def timed() -> float:
        for device in cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        for device in cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    warm = [timed() for _ in range(warmup)]
    extra = 0
    while warmup and extra < MAX_EXTRA_WARMUP and not settled(warm):
        warm.append(timed())
        extra += 1
    return [timed() for _ in range(max(1, repeats))]


def settled(times: list[float]) -> bool:
    """Whether the last two warm-up times are within ``SETTLED_WITHIN`` of each other (one
    warm-up step alone cannot tell, and counts as settled only if no more were asked for)."""
    if len(times) < 2:
        return len(times) <= 1
    last, before = times[-1], times[-2]
    return abs(last - before) <= SETTLED_WITHIN * max(last, before)


def time_summary(times: list[float]) -> dict[str, Any]:
    """results.csv's step-time columns: the median, the interquartile range (0 for one time)
    and whether the cell's own time is noisy (its IQR above ``NOISY_SPREAD`` of its median)."""
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    median, iqr = statistics.median(times), quartiles[2] - quartiles[0]
    return {"step_time_median_s": median, "step_time_iqr_s": iqr, "time_noisy": iqr > NOISY_SPREAD * median}


@dataclass(frozen=True)
class Overhead:
    """A strategy's step time against the plain step's in the same cell."""

    ratio: float  # its median over the plain median, less one
    noisy: bool  # the difference lies within the spread of the two cells

    def text(self) -> str:
        return "within noise" if self.noisy else f"{self.ratio:+.0%}"


def overhead(median: float, iqr: float, base_median: float, base_iqr: float,
             noisy: bool = False, base_noisy: bool = False) -> Overhead:
    """The time overhead of a cell over its plain twin. Noisy when either cell is noisy on
    its own, or when the two medians differ by less than the sum of their IQRs: a difference
    the repeats themselves spread over is no evidence of a cost."""
    ratio = median / base_median - 1
    within = abs(median - base_median) <= iqr + base_iqr
    return Overhead(ratio, noisy or base_noisy or within)
