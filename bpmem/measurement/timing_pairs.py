"""A strategy's time overhead, timed in pairs with the plain step, and how far to trust it.

Two cells timed minutes apart on a shared machine can differ by anything the other jobs did
in between. So a strategy's step is timed interleaved with the plain step of the same model,
batch, optimizer and mode, in the same process: plain, strategy, plain, strategy, ...
(``time_pairs``). A load that comes and goes hits both steps of a pair alike, and the
overhead is the median of the per-pair ratios strategy_i / plain_i, less one
(``paired_overhead``).

Confidence: the median's distribution-free interval from order statistics (``median_interval``):
with n pairs, the k-th smallest and k-th largest ratios bound the median of the ratios'
distribution with probability 1 - 2 P(Binomial(n, 1/2) < k), whatever that distribution is;
k is the largest rank that keeps this at least ``CONFIDENCE``. At 95% it needs n >= 6.

Stopping: at least ``repeats`` pairs (the sweep's), then more until the interval is narrow
(half-width at most ``TARGET_HALF_WIDTH`` of the ratio), or ``MAX_PAIRS`` pairs, or
``MAX_TIMED_SECONDS`` of timed steps, or the cell is contended (a CPU cell: no number of
pairs makes a loaded machine's ratio the idle one's), whichever comes first.

Judgement (``judge``): the report states an overhead only when the interval excludes zero and
the cell is not contended (``bpmem.measurement.timing``); otherwise "within noise" or "contended", never a
number. A row without a paired overhead (a split strategy's, a file written before pairing)
is "not paired".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bpmem.measurement.timing import (
    CLOCKS,
    Clocks,
    StepTime,
    contended,
    cpu_columns,
    time_summary,
    timer,
    warm_up,
)

CONFIDENCE = 0.95  # of the overhead's interval
# Stop adding pairs once the interval's half-width is at most 5% of the ratio: the report
# prints whole percents, and a cost known to +-5% of the step is a cost one can plan with.
TARGET_HALF_WIDTH = 0.05
# Caps, so a noisy or slow cell cannot take forever: pairs, and seconds of timed steps (both
# steps of every pair; warm-up not counted). 40 pairs resolve a few percent even with a
# spread of 10% per pair; 8 s bounds a noisy default sweep's 84 paired cells to ~11 minutes.
MAX_PAIRS = 40
MAX_TIMED_SECONDS = 8.0


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """A distribution-free ``confidence`` interval for the median of the distribution
    ``values`` were drawn from: the k-th smallest and the k-th largest value, k the largest
    rank with P(Binomial(n, 1/2) <= k-1) <= (1-confidence)/2. None when even the smallest
    and largest value cover too little (n < 6 at 95%)."""
    n, tail = len(values), (1 - confidence) / 2
    total, below, k = 2 ** n, 0, 0  # below: how many of the 2**n sign patterns put fewer than k+1 values under
    while k < n // 2 and (below + math.comb(n, k)) / total <= tail:
        below += math.comb(n, k)
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


@dataclass(frozen=True)
class PairedOverhead:
    """A strategy's step time over the plain step's, from pairs timed together."""

    overhead: float  # the median per-pair ratio, less one
    low: float | None  # the interval's ends, as overheads; None with too few pairs
    high: float | None
    pairs: int

    @property
    def narrow(self) -> bool:
        """Whether the interval's half-width is at most ``TARGET_HALF_WIDTH`` of the ratio."""
        if self.low is None or self.high is None:
            return False
        return (self.high - self.low) / 2 <= TARGET_HALF_WIDTH * (1 + self.overhead)


def paired_overhead(plain: Sequence[float], strategy: Sequence[float],
                    confidence: float = CONFIDENCE) -> PairedOverhead:
    """The overhead of ``strategy``'s times over ``plain``'s, pair by pair (``plain[i]`` was
    timed just before ``strategy[i]``)."""
    ratios = [s / p for p, s in zip(plain, strategy, strict=True) if p > 0]
    interval = median_interval(ratios, confidence)
    low, high = (None, None) if interval is None else (interval[0] - 1, interval[1] - 1)
    return PairedOverhead(statistics.median(ratios) - 1, low, high, len(ratios))


@dataclass(frozen=True)
class Paired:
    """The timed steps of a pairing, in order: ``plain[i]`` ran just before ``strategy[i]``."""

    plain: tuple[StepTime, ...]
    strategy: tuple[StepTime, ...]

    def overhead(self) -> PairedOverhead:
        return paired_overhead([s.wall_s for s in self.plain], [s.wall_s for s in self.strategy])


def time_pairs(plain: Callable[[], Any], strategy: Callable[[], Any], warmup: int, repeats: int,
               devices: Iterable[Any] = (), clocks: Clocks = CLOCKS, max_pairs: int = MAX_PAIRS,
               max_seconds: float = MAX_TIMED_SECONDS) -> Paired:
    """Warm both up in turn, then time plain, strategy, plain, strategy, ...: at least
    ``repeats`` pairs (one at least), then until the overhead's interval is narrow, or
    ``max_pairs`` pairs, or ``max_seconds`` of timed steps."""
    devices = list(devices)
    on_cuda = any(str(device).startswith("cuda") for device in devices)  # the CPU waits on the GPU there
    timers = [timer(plain, devices, clocks), timer(strategy, devices, clocks)]
    warm_up(timers, warmup)
    plain_times: list[StepTime] = []
    strategy_times: list[StepTime] = []
    spent = 0.0
    while True:
        plain_times.append(timers[0]())
        strategy_times.append(timers[1]())
        spent += plain_times[-1].wall_s + strategy_times[-1].wall_s
        if len(plain_times) < max(1, repeats):
            continue  # the sweep's repeats are the minimum, however long they take
        if (len(plain_times) >= max_pairs or spent >= max_seconds
                or (not on_cuda and contended([*plain_times, *strategy_times]))  # more pairs cannot help
                or paired_overhead([p.wall_s for p in plain_times], [s.wall_s for s in strategy_times]).narrow):
            return Paired(tuple(plain_times), tuple(strategy_times))


def paired_columns(paired: Paired, judge_cpu: bool) -> dict[str, Any]:
    """A strategy row's time columns: its own steps' median, IQR, noise and CPU time, the
    contention of every step the pairing timed, and the paired overhead with its interval."""
    own = paired.strategy
    cost = paired.overhead()
    return {**time_summary([s.wall_s for s in own]),
            **cpu_columns(own, [*paired.plain, *own] if judge_cpu else None),
            "time_overhead": cost.overhead, "time_overhead_low": cost.low, "time_overhead_high": cost.high,
            "time_pairs": cost.pairs}


def _number(value: Any) -> float | None:
    """A float from a results.csv cell, None where it is empty (None, NaN, pandas' NA)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _flag(value: Any) -> bool:
    """A boolean cell as pandas reads it: True, numpy's True, the text "true"; empty is false."""
    if isinstance(value, str):
        return value.strip().lower() == "true"
    try:
        return value is not None and not math.isnan(value) and bool(value)
    except (TypeError, ValueError):  # pandas' NA: empty
        return False


@dataclass(frozen=True)
class Verdict:
    """What the report may say about one cell's time overhead."""

    kind: str  # "stated", "within noise", "contended" or "not paired"
    overhead: float | None = None  # only when stated

    def text(self) -> str:
        return f"{self.overhead:+,.0%}" if self.kind == "stated" and self.overhead is not None else self.kind


def judge(overhead: Any, low: Any, high: Any, contended: Any) -> Verdict:
    """A row's overhead, stated only when its interval excludes zero and it is not contended."""
    overhead, low, high = _number(overhead), _number(low), _number(high)
    if overhead is None:
        return Verdict("not paired")
    if _flag(contended):
        return Verdict("contended")
    if low is None or high is None or low <= 0 <= high:
        return Verdict("within noise")
    return Verdict("stated", overhead)
