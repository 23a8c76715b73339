"""Step times that can be trusted on a shared machine, and a judgement of when they cannot.

Memory is counted exactly; time is measured, and a measurement on a shared machine is noisy.
So bpmem:

- pins the number of intra-op threads for a whole sweep and records it in every row
  (``threads``): a step timed with 2 threads is not comparable with one timed with 16;
- warms up until the step time settles (``warm_up``): at least ``warmup`` untimed steps, then
  more, up to ``MAX_EXTRA_WARMUP``, until two in a row differ by less than ``SETTLED_WITHIN``
  (allocator caches, oneDNN's kernel choice and CPU frequency settle over the first steps);
- keeps the median and the interquartile range of the timed steps (``time_summary``), and
  calls a cell's own time noisy (``time_noisy``) when its IQR is over ``NOISY_SPREAD`` of its
  median;
- records each timed step's process CPU time (``time.process_time``) beside its wall time,
  and calls a CPU cell contended (``time_contended``) when more than ``CONTENDED_SHARE`` of
  its timed steps got less CPU time than ``CONTENDED_BELOW`` of their wall time. A CPU step
  that runs gets at least one core's worth of CPU time while it runs: a mostly
  single-threaded small step with 2 intra-op threads shows CPU/wall of about 1, a parallel
  one up to the thread count; one that shows 8 ms of CPU in 440 ms of wall spent most of its
  time waiting for a core another process held. On CUDA the rule is not applied (empty
  column): the CPU legitimately waits on the GPU there;
- times a strategy's step paired with the plain step of the same model, batch, optimizer and
  mode in the same process (``bpmem.measurement.timing_pairs``): the overhead is the median of the
  per-pair ratios, with a distribution-free confidence interval, so a load that comes and
  goes hits both steps of a pair alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

SETTLED_WITHIN = 0.10  # two warm-up steps within 10% of each other: the time has settled
MAX_EXTRA_WARMUP = 10  # at most this many warm-up steps beyond the ones asked for
NOISY_SPREAD = 0.25  # an IQR above a quarter of the median: the cell's own time is noisy
# A step that got less than half a core's worth of CPU time over its wall time waited for
# cores: an idle CPU step runs at CPU/wall >= ~1 (one busy thread at least), so half leaves
# a wide margin below it and still catches a step that spent most of its time descheduled.
CONTENDED_BELOW = 0.5
# A cell is contended when more than a quarter of its timed steps were: a median survives a
# few slowed steps, not a load that held the cores for much of the cell.
CONTENDED_SHARE = 0.25


@dataclass(frozen=True)
class Clocks:
    """The two clocks a timed step reads; tests give fake ones."""

    wall: Callable[[], float] = time.perf_counter
    cpu: Callable[[], float] = time.process_time  # this process's CPU time, every thread's


CLOCKS = Clocks()


@dataclass(frozen=True)
class StepTime:
    """One timed step: its wall time and the process CPU time it used, in seconds."""

    wall_s: float
    cpu_s: float

    @property
    def contended(self) -> bool:
        """Whether the step waited for cores: less CPU time than ``CONTENDED_BELOW`` of its wall."""
        return self.cpu_s < CONTENDED_BELOW * self.wall_s


def pin_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count for this process (``None`` keeps torch's default)
    and return the count that steps will run with."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def timer(run: Callable[[], Any], devices: Iterable[Any] = (), clocks: Clocks = CLOCKS) -> Callable[[], StepTime]:
    """A function that runs ``run()`` once and returns its ``StepTime``. Each call is
    bracketed by ``torch.cuda.synchronize`` on every CUDA device among ``devices``, so the
    clock sees the kernels, not just their launch."""
    devices = list(devices)
    cuda: list[Any] = []
    if devices:  # no device, no torch: the fake runs of the tests need none
        import torch

        cuda = [d for d in dict.fromkeys(torch.device(d) for d in devices) if d.type == "cuda"]

    def synchronize() -> None:
        for device in cuda:
            torch.cuda.synchronize(device)

    def timed() -> StepTime:
        synchronize()
        wall, cpu = clocks.wall(), clocks.cpu()
        run()
        synchronize()
        return StepTime(clocks.wall() - wall, clocks.cpu() - cpu)

    return timed


def warm_up(timers: Sequence[Callable[[], StepTime]], warmup: int) -> None:
    """Untimed rounds of every timer in turn (a pair's two steps alternate as they will when
    timed): ``warmup`` rounds, then more, up to ``MAX_EXTRA_WARMUP``, until each one's last
    two times have settled."""
    warm: list[list[float]] = [[] for _ in timers]
    rounds = 0
    while rounds < warmup or (warmup and rounds < warmup + MAX_EXTRA_WARMUP
                              and not all(settled(times) for times in warm)):
        for times, timed in zip(warm, timers, strict=True):
            times.append(timed().wall_s)
        rounds += 1


def time_samples(run: Callable[[], Any], warmup: int, repeats: int, devices: Iterable[Any] = (),
                 clocks: Clocks = CLOCKS) -> list[StepTime]:
    """``run()`` warmed up (``warm_up``), then ``repeats`` timed calls (at least one)."""
    timed = timer(run, devices, clocks)
    warm_up([timed], warmup)
    return [timed() for _ in range(max(1, repeats))]


def time_calls(run: Callable[[], Any], warmup: int, repeats: int, devices: Iterable[Any] = ()) -> list[float]:
    """Seconds (wall) per call of ``run()``: ``time_samples``' wall times."""
    return [sample.wall_s for sample in time_samples(run, warmup, repeats, devices)]


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


def contended(samples: Iterable[StepTime]) -> bool:
    """Whether more than ``CONTENDED_SHARE`` of the timed steps waited for cores."""
    samples = list(samples)
    return sum(s.contended for s in samples) > CONTENDED_SHARE * len(samples)


def cpu_columns(own: Sequence[StepTime], judged: Iterable[StepTime] | None) -> dict[str, Any]:
    """``step_cpu_time_median_s`` of the row's own steps, and ``time_contended`` judged on
    ``judged`` (every step the cell timed, a pair's plain steps too); ``judged=None`` (a CUDA
    step, whose CPU waits on the GPU) leaves it empty."""
    return {"step_cpu_time_median_s": statistics.median(s.cpu_s for s in own),
            "time_contended": None if judged is None else contended(judged)}


def plain_columns(samples: Sequence[StepTime], judge_cpu: bool) -> dict[str, Any]:
    """The time columns of a row timed alone (the plain step, a step that could not be
    paired): its own median, IQR, noise, CPU time and contention; no paired overhead."""
    return {**time_summary([s.wall_s for s in samples]), **cpu_columns(samples, samples if judge_cpu else None)}
