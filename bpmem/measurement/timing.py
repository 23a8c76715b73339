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
- records each timed step's process CPU time (``time.process_time``) and the CPU time every
  other process on the machine used meanwhile (``other_processes_cpu_s``) beside its wall
  time, and calls a CPU cell contended (``time_contended``) when either shows another
  process held the cores:
  - more than ``CONTENDED_SHARE`` of its timed steps got less CPU time than
    ``CONTENDED_BELOW`` of their wall time. A CPU step that runs gets at least one core's
    worth of CPU time: a mostly single-threaded small step with 2 intra-op threads shows
    CPU/wall of about 1, a parallel one up to the thread count; one that shows 8 ms of CPU
    in 440 ms of wall spent most of its time waiting for a core;
  - or, over its timed steps (when they add up to ``OTHERS_MIN_WALL_S`` or more), the other
    processes kept more cores busy on average than the cores this one leaves free (the
    machine's logical CPUs less its intra-op threads) plus ``CONTENDED_OTHERS``. That catches
    what the first rule cannot: two thread pools on the same cores whose threads spin while
    they wait, so each step still shows CPU/wall near 1 while it runs several times slower
    (a second torch job on a 2-core machine does this).

  On CUDA neither rule is applied (empty column): the CPU legitimately waits on the GPU;
- times a strategy's step paired with the plain step of the same model, batch, optimizer and
  mode in the same process (``bpmem.measurement.timing_pairs``): the overhead is the median of the
  per-pair ratios, with a distribution-free confidence interval, so a load that comes and
  goes hits both steps of a pair alike.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

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
# Other processes busy on more than a quarter of a core beyond the cores this one leaves free:
# an idle machine's daemons stay far below it (a few hundredths of a core); a second job on
# the same cores sits near a whole core or more.
CONTENDED_OTHERS = 0.25
# The machine's busy time is counted in ticks (10 ms per CPU on Linux), so the other processes'
# share is judged only over timed steps of at least half a second together: a tick or two of
# miscount per CPU is then a few hundredths of a core, well inside CONTENDED_OTHERS.
OTHERS_MIN_WALL_S = 0.5


def other_processes_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (every logical CPU, from /proc/stat on
    Linux) less this process's own: what every other process has used. Read in 10 ms ticks,
    so only a sum over many steps is meaningful."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    guests = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # counted in user and nice
    return sum(times) - idle - guests - time.process_time()


def spare_cores() -> float:
    """Logical CPUs this process's intra-op threads leave to others."""
    import torch

    return max(0.0, float((psutil.cpu_count() or 1) - torch.get_num_threads()))


@dataclass(frozen=True)
class Clocks:
    """The two clocks a timed step reads; tests give fake ones."""

    wall: Callable[[], float] = time.perf_counter
    cpu: Callable[[], float] = time.process_time  # this process's CPU time, every thread's
    others: Callable[[], float] = other_processes_cpu_s  # every other process's CPU time
    spare: Callable[[], float] = spare_cores  # cores the others may use without contention


CLOCKS = Clocks()


@dataclass(frozen=True)
class StepTime:
    """One timed step: its wall time, the process CPU time it used, and the CPU time other
    processes used meanwhile, in seconds; ``spare_cores``, the cores it left to them."""

    wall_s: float
    cpu_s: float
    others_s: float = 0.0
    spare_cores: float = 0.0

    @property
    def contended(self) -> bool:
        """Whether the step waited for cores: less CPU time than ``CONTENDED_BELOW`` of its wall."""
        return self.cpu_s < CONTENDED_BELOW * self.wall_s


def threads_per_job(threads: int | None, jobs: int) -> int | None:
    """The intra-op thread count each of ``jobs`` CPU workers steps with: the config's
    ``threads`` if set, else torch's default divided among the jobs (at least one). N
    workers each spinning torch's whole pool on the same cores ran the default sweep 2.3x
    slower with ``--jobs 2`` than with one job on 2 cores; sharing the pool made it 1.4x faster."""
    import torch

    if threads is not None or jobs <= 1:
        return threads
    return max(1, torch.get_num_threads() // jobs)


def pin_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count for this process (``None`` keeps torch's default)
    and return the count that steps will run with."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[int]:
    """``pin_threads`` for a block, torch's count before it restored after (a sweep run from
    Python, or a test, leaves the process as it found it)."""
    import torch

    before = torch.get_num_threads()
    try:
        yield pin_threads(threads)
    finally:
        torch.set_num_threads(before)


def timer(run: Callable[[], Any], devices: Iterable[Any] = (), clocks: Clocks = CLOCKS) -> Callable[[], StepTime]:
    """A function that runs ``run()`` once and returns its ``StepTime``. Each call is
    bracketed by ``torch.cuda.synchronize`` on every CUDA device among ``devices``, so the
    clock sees the kernels, not just their launch."""
    devices = list(devices)
    cuda: list[Any] = []
    if devices:  # no device, no torch: the fake runs of the tests need none
        import torch

        cuda = [d for d in dict.fromkeys(torch.device(d) for d in devices) if d.type == "cuda"]

    spare = clocks.spare()  # read once: the thread count does not change within a cell

    def synchronize() -> None:
        for device in cuda:
            torch.cuda.synchronize(device)

    def timed() -> StepTime:
        synchronize()
        wall, cpu, others = clocks.wall(), clocks.cpu(), clocks.others()
        run()
        synchronize()
        return StepTime(clocks.wall() - wall, clocks.cpu() - cpu, clocks.others() - others, spare)


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
    """Whether more than ``CONTENDED_SHARE`` of the timed steps waited for cores, or other
    processes kept more than the spare cores and ``CONTENDED_OTHERS`` busy over them all."""
    samples = list(samples)
    if sum(s.contended for s in samples) > CONTENDED_SHARE * len(samples):
        return True
    wall = sum(s.wall_s for s in samples)
    spare = min((s.spare_cores for s in samples), default=0.0)
    return wall >= OTHERS_MIN_WALL_S and sum(s.others_s for s in samples) / wall > spare + CONTENDED_OTHERS


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
