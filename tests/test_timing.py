"""Timing that can be trusted on a shared machine: pairs timed in turn, the overhead's
order-statistic interval, the stopping rule, the CPU-time rule for contention, and what the
report says of each. Every test but the last runs on fake clocks and fake steps: no wall time
is asserted."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bpmem.measurement.timing import (
    CONTENDED_BELOW,
    CONTENDED_OTHERS,
    OTHERS_MIN_WALL_S,
    Clocks,
    StepTime,
    contended,
    other_processes_cpu_s,
    plain_columns,
    time_samples,
)
from bpmem.measurement.timing_pairs import (
    MAX_PAIRS,
    MAX_TIMED_SECONDS,
    Paired,
    judge,
    median_interval,
    paired_columns,
    paired_overhead,
    time_pairs,
)
from bpmem.report.text import summary_section
from tests.toml_text import run_sweep


class FakeClocks:
    """A wall clock and a CPU clock that only fake steps move."""

    def __init__(self) -> None:
        self.wall, self.cpu, self.others = 0.0, 0.0, 0.0
        self.calls: list[str] = []

    def clocks(self) -> Clocks:
        return Clocks(wall=lambda: self.wall, cpu=lambda: self.cpu, others=lambda: self.others, spare=lambda: 0.0)

    def step(self, name: str, walls: list[float], cpu_share: float = 1.0, others_cores: float = 0.0) -> Any:
        """A fake step that logs its name and takes walls[i] seconds on its i-th call
        (the last one ever after), with cpu_share of that in CPU time, while other processes
        keep ``others_cores`` cores busy."""
        count = {"n": 0}

        def run() -> None:
            wall = walls[min(count["n"], len(walls) - 1)]
            count["n"] += 1
            self.calls.append(name)
            self.wall += wall
            self.cpu += cpu_share * wall
            self.others += others_cores * wall

        return run


def _coverage(n: int, k: int) -> float:
    """P(the k-th smallest and k-th largest of n draws bracket the median) = 1 - 2 P(B <= k-1)."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n


@pytest.mark.parametrize(("n", "k"), [(6, 1), (8, 1), (9, 2), (10, 2), (20, 6), (40, 14)])
def test_the_interval_is_the_order_statistics_the_binomial_gives(n: int, k: int) -> None:
    values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose: n, n-1, ..., 1
    assert median_interval(values) == (float(k), float(n + 1 - k))
    # k is the largest rank that still covers 95%: one rank further in does not
    assert _coverage(n, k) >= 0.95 > _coverage(n, k + 1)


def test_too_few_values_have_no_interval() -> None:
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # [min, max] of 5 covers 93.75% only
    assert median_interval([1.0]) is None and median_interval([]) is None
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0], confidence=0.9) == (1.0, 5.0)


def test_the_paired_overhead_is_the_median_per_pair_ratio() -> None:
    # the load doubles both steps of the last pairs: the per-pair ratio stays 1.25
    plain = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    strategy = [1.25, 1.25, 1.25, 2.5, 2.5, 2.5]
    cost = paired_overhead(plain, strategy)
    assert cost.overhead == pytest.approx(0.25) and cost.pairs == 6
    assert cost.low == pytest.approx(0.25) and cost.high == pytest.approx(0.25) and cost.narrow


def test_pairing_interleaves_plain_and_strategy() -> None:
    fake = FakeClocks()
    paired = time_pairs(fake.step("plain", [1.0]), fake.step("strategy", [1.1]), warmup=2, repeats=6,
                        clocks=fake.clocks())
    assert len(paired.plain) == len(paired.strategy) == 6
    assert fake.calls == ["plain", "strategy"] * (2 + 6)  # warm-up in turn too
    assert all(s.wall_s == pytest.approx(1.1) for s in paired.strategy)


def test_warm_up_goes_on_until_both_steps_settle() -> None:
    fake = FakeClocks()
    # the strategy's first steps are slow (caches filling): 3.0, 2.0, 1.1, then 1.0
    paired = time_pairs(fake.step("plain", [1.0]), fake.step("strategy", [3.0, 2.0, 1.1, 1.0]), warmup=2,
                        repeats=6, clocks=fake.clocks())
    # 2 warm-up rounds asked for, 2 more until the strategy's last two agree within 10% (1.1, 1.0)
    assert len(fake.calls) == 2 * (4 + 6) and fake.calls == ["plain", "strategy"] * 10
    assert paired.strategy[0].wall_s == pytest.approx(1.0)


def test_a_narrow_interval_stops_at_the_minimum() -> None:
    fake = FakeClocks()
    paired = time_pairs(fake.step("plain", [1.0]), fake.step("strategy", [1.2]), warmup=0, repeats=8,
                        clocks=fake.clocks())
    assert len(paired.plain) == 8  # repeats is the minimum, even when 6 pairs would do
    fake = FakeClocks()
    paired = time_pairs(fake.step("plain", [0.01]), fake.step("strategy", [0.012]), warmup=0, repeats=2,
                        clocks=fake.clocks())
    assert len(paired.plain) == 6  # the first count of pairs that has a 95% interval


def test_a_wide_interval_continues_to_the_pair_cap() -> None:
    fake = FakeClocks()
    # every other strategy step twice as slow: ratios 1, 2, 1, 2, ... never narrow
    paired = time_pairs(fake.step("plain", [0.001]), fake.step("strategy", [0.001, 0.002] * 100), warmup=0,
                        repeats=3, clocks=fake.clocks())
    assert len(paired.plain) == MAX_PAIRS
    cost = paired.overhead()
    assert not cost.narrow and cost.low == pytest.approx(0.0) and cost.high == pytest.approx(1.0)


def test_a_slow_cell_stops_at_the_seconds_cap() -> None:
    fake = FakeClocks()
    pair = MAX_TIMED_SECONDS / 4  # each pair's two steps take a quarter of the cap
    paired = time_pairs(fake.step("plain", [pair / 2]), fake.step("strategy", [pair / 4, pair / 2, 3 * pair / 4]),
                        warmup=0, repeats=2, clocks=fake.clocks())
    assert len(paired.plain) == 4  # 4 pairs of about MAX_TIMED_SECONDS / 4 each, never an interval
    assert time_pairs(fake.step("plain", [100.0]), fake.step("strategy", [100.0]), warmup=0, repeats=3,
                      clocks=fake.clocks()).overhead().pairs == 3  # but never fewer than repeats


def test_a_contended_step_waited_for_cores() -> None:
    assert StepTime(wall_s=0.44, cpu_s=0.008).contended  # the shared machine's 440 ms step
    assert not StepTime(wall_s=0.008, cpu_s=0.0078).contended  # a small step, one busy thread of two
    assert not StepTime(wall_s=0.008, cpu_s=0.0155).contended  # both threads busy
    assert StepTime(wall_s=1.0, cpu_s=CONTENDED_BELOW * 0.99).contended
    slow = [StepTime(0.44, 0.008)]
    fast = [StepTime(0.008, 0.008)]
    assert not contended(slow + fast * 3)  # one slowed step in four: the median survives it
    assert contended(slow * 2 + fast * 5)  # more than a quarter


def test_other_processes_busy_on_the_cores_make_a_cell_contended() -> None:
    """Two thread pools on the same 2 cores: each step still shows CPU/wall near 1 (the waiting
    threads spin), so only the other processes' CPU time tells. The machine's spare cores
    (logical CPUs less the intra-op threads) are theirs to use."""
    spinning = [StepTime(wall_s=0.06, cpu_s=0.06, others_s=0.06, spare_cores=0.0)] * 10  # a core's worth
    assert not any(s.contended for s in spinning) and contended(spinning)
    daemons = [StepTime(wall_s=0.06, cpu_s=0.06, others_s=0.002, spare_cores=0.0)] * 10  # 3% of a core
    assert not contended(daemons)
    on_a_big_machine = [StepTime(wall_s=0.06, cpu_s=0.06, others_s=0.06 * 13, spare_cores=14.0)] * 10
    assert not contended(on_a_big_machine)  # 13 busy cores of the 14 this step leaves free
    edge = OTHERS_MIN_WALL_S * CONTENDED_OTHERS
    assert contended([StepTime(OTHERS_MIN_WALL_S, OTHERS_MIN_WALL_S, edge * 1.01)])
    assert not contended([StepTime(OTHERS_MIN_WALL_S, OTHERS_MIN_WALL_S, edge * 0.99)])
    # a tick of 10 ms over 4 ms of steps is no evidence either way: too short to judge
    assert not contended([StepTime(0.001, 0.001, 0.0025)] * 4)


def test_pairs_stop_at_the_repeats_once_the_cell_is_contended() -> None:
    fake = FakeClocks()
    paired = time_pairs(fake.step("plain", [0.1], others_cores=1.0), fake.step("strategy", [0.2], others_cores=1.0),
                        warmup=0, repeats=3, clocks=fake.clocks())
    assert paired.overhead().pairs == 3 and paired_columns(paired, judge_cpu=True)["time_contended"] is True
    idle = FakeClocks()  # noisy but idle: more pairs, to narrow the interval
    paired = time_pairs(idle.step("plain", [0.01, 0.013]), idle.step("strategy", [0.02, 0.017, 0.023]),
                        warmup=0, repeats=3, clocks=idle.clocks())
    assert paired.overhead().pairs > 3


def test_the_other_processes_clock_sees_a_second_process_burn_cpu() -> None:
    import subprocess
    import sys
    import time

    before, start = other_processes_cpu_s(), time.perf_counter()
    subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 0.5\n"
                    "while time.process_time() < end: pass"], check=True, timeout=60)
    used, wall = other_processes_cpu_s() - before, time.perf_counter() - start
    assert 0.4 <= used <= wall + 0.2  # the child's half second, in 10 ms ticks, and little else


@pytest.mark.slow  # a real second torch job on the same cores, a few seconds
def test_a_step_beside_a_second_torch_job_is_contended() -> None:
    """What made the +10,000% overheads: another torch job with its own thread pool on the
    same cores. Every step slowed, CPU/wall stayed near 1, and the old rule said idle."""
    import subprocess
    import sys

    import torch

    load = subprocess.Popen([sys.executable, "-c", "import torch\ntorch.set_num_threads(2)\n"
                             "a = torch.randn(384, 384)\nprint('running', flush=True)\n"
                             "while True: a = torch.tanh(a @ a)"], stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout is not None and load.stdout.readline() == "running\n"  # torch imported, loop on
        x = torch.randn(384, 384)
        samples = time_samples(lambda: [torch.tanh(x @ x) for _ in range(20)], warmup=1, repeats=10)
        assert sum(s.wall_s for s in samples) >= OTHERS_MIN_WALL_S
    finally:
        load.kill()
        load.wait()
    assert contended(samples), [(s.wall_s, s.cpu_s, s.others_s, s.spare_cores) for s in samples]


def test_time_samples_records_cpu_time_and_the_rule_only_where_judged() -> None:
    fake = FakeClocks()
    samples = time_samples(fake.step("plain", [0.44]), warmup=1, repeats=5, clocks=fake.clocks())
    samples = [StepTime(s.wall_s, 0.008) for s in samples]
    columns = plain_columns(samples, judge_cpu=True)
    assert columns["time_contended"] is True and columns["step_cpu_time_median_s"] == pytest.approx(0.008)
    assert columns["step_time_median_s"] == pytest.approx(0.44) and columns["time_noisy"] is False
    assert plain_columns(samples, judge_cpu=False)["time_contended"] is None  # CUDA: the CPU waits on the GPU


def test_paired_columns_judge_the_plain_steps_of_the_pairs_too() -> None:
    idle, busy = StepTime(0.008, 0.008), StepTime(0.44, 0.008)
    paired = Paired(plain=(busy,) * 6, strategy=(StepTime(0.01, 0.01),) * 6)
    columns = paired_columns(paired, judge_cpu=True)
    assert columns["time_contended"] is True and columns["time_pairs"] == 6
    paired = Paired(plain=(idle,) * 6, strategy=(StepTime(0.01, 0.01),) * 6)
    columns = paired_columns(paired, judge_cpu=True)
    assert columns["time_contended"] is False and columns["time_overhead"] == pytest.approx(0.25)
    assert columns["time_overhead_low"] == pytest.approx(0.25) == columns["time_overhead_high"]
    assert columns["step_time_median_s"] == pytest.approx(0.01)  # the strategy's own steps


def test_judge_states_an_overhead_only_outside_noise_and_contention() -> None:
    assert judge(0.3, 0.2, 0.4, False).text() == "+30%"
    assert judge(-0.1, -0.2, -0.05, None).text() == "-10%"  # faster, and sure of it
    assert judge(0.02, -0.01, 0.05, False).text() == "within noise"
    assert judge(0.5, float("nan"), float("nan"), False).text() == "within noise"  # too few pairs
    assert judge(105.22, 104.0, 106.0, True).text() == "contended"
    assert judge(None, None, None, None).text() == "not paired"  # a file written before pairing
    assert judge(float("nan"), float("nan"), float("nan"), float("nan")).text() == "not paired"


def _frame(cells: list[dict[str, Any]]) -> pd.DataFrame:
    """A report frame: a plain row and a checkpoint-sqrt row per cell, at batch 8, 16, ..."""
    rows = []
    for batch, cell in zip((8, 16, 32, 64), cells, strict=False):
        same = {"mode": "train", "status": "ok", "model": "depth 4", "batch_size": batch, "device": "cpu",
                "optimizer": "sgd", "dtype": "float32", "activation": "relu", "loss": "mse"}
        rows.append({**same, "strategy": "none", "label": "none", "saved_activation_bytes": 1000,
                     "time_overhead": None, "time_overhead_low": None, "time_overhead_high": None,
                     "time_contended": False})
        rows.append({**same, "strategy": "checkpoint-sqrt", "label": "checkpoint-sqrt",
                     "saved_activation_bytes": 500, "time_contended": False, **cell})
    return pd.DataFrame(rows)


def _time_cell(frame: pd.DataFrame) -> str:
    line = next(r for r in summary_section(frame).splitlines() if r.startswith("| checkpoint-sqrt"))
    return line.split("|")[4].strip()


def test_the_report_says_contended_not_a_number() -> None:
    cost = {"time_overhead": 105.22, "time_overhead_low": 104.0, "time_overhead_high": 106.0}
    cell = _time_cell(_frame([{**cost, "time_contended": True}, {**cost, "time_contended": True}]))
    assert cell == "contended (2 of 2 cells)" and "%" not in cell


def test_the_report_says_within_noise_when_the_interval_includes_zero() -> None:
    cell = _time_cell(_frame([{"time_overhead": 0.02, "time_overhead_low": -0.01, "time_overhead_high": 0.05}]))
    assert cell == "within noise (1 of 1 cells)" and "%" not in cell


def test_the_report_states_the_median_over_stated_cells_and_counts_the_rest() -> None:
    cells = [{"time_overhead": 0.30, "time_overhead_low": 0.25, "time_overhead_high": 0.35},
             {"time_overhead": 0.10, "time_overhead_low": 0.05, "time_overhead_high": 0.15},
             {"time_overhead": 0.01, "time_overhead_low": -0.02, "time_overhead_high": 0.04},
             {"time_overhead": 99.0, "time_overhead_low": 98.0, "time_overhead_high": 100.0, "time_contended": True}]
    assert _time_cell(_frame(cells)) == "+30% (median of 2 cells; 1 within noise; 1 contended)"


def _tiny() -> tuple[Any, Any]:
    from bpmem.spec import MLPSpec
    from bpmem.strategies.registry import make_step

    return MLPSpec(input_dim=8, hidden_dim=8, output_dim=2, depth=2), make_step("checkpoint-sqrt", batch_size=2)


def test_time_steps_pairs_a_strategy_with_its_plain_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real steps of a tiny MLP (milliseconds): a strategy's step goes through time_pairs with
    the sweep's warm-up and repeats, and its row gets the paired columns; the plain step's does not."""
    import bpmem.measurement.cell

    spec, step = _tiny()
    seen: list[Any] = []
    real = bpmem.measurement.cell.time_pairs

    def spy(plain: Any, strategy: Any, warmup: int, repeats: int, devices: Any = (),
            max_seconds: float = MAX_TIMED_SECONDS) -> Paired:
        seen.append((warmup, repeats, list(devices), max_seconds))
        return real(plain, strategy, warmup, repeats, devices, max_pairs=6)

    monkeypatch.setattr(bpmem.measurement.cell, "time_pairs", spy)
    columns = bpmem.measurement.cell.time_steps(spec, step, "cpu", warmup=0, repeats=1)
    assert seen == [(0, 1, ["cpu"], MAX_TIMED_SECONDS)] and columns["time_pairs"] == 6
    assert columns["time_overhead_low"] <= columns["time_overhead"] <= columns["time_overhead_high"]
    assert columns["time_contended"] in (True, False) and columns["step_cpu_time_median_s"] >= 0
    from bpmem.strategies.base import NoStrategy

    plain = bpmem.measurement.cell.time_steps(spec, step.replace(strategy=NoStrategy()), "cpu", warmup=0, repeats=2)
    assert len(seen) == 1 and "time_overhead" not in plain  # the plain step is timed alone
    assert plain["time_contended"] in (True, False) and plain["step_time_median_s"] > 0


def test_a_timing_cap_of_zero_times_exactly_the_sweeps_repeats() -> None:
    """``timing_cap_s = 0`` in a config: no pairs beyond ``repeats``, however wide the interval."""
    import bpmem.measurement.cell

    spec, step = _tiny()
    columns = bpmem.measurement.cell.time_steps(spec, step, "cpu", warmup=0, repeats=2, max_seconds=0)
    assert columns["time_pairs"] == 2


@pytest.mark.parametrize("value", [-1, "soon", True, float("inf")])
def test_a_bad_timing_cap_names_the_key(value: Any) -> None:
    from bpmem.sweep.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"timing_cap_s: .* allowed: a number of seconds >= 0"):
        parse_config({"timing_cap_s": value})
    assert parse_config({"timing_cap_s": 0}).timing_cap_s == 0


def test_a_plain_twin_out_of_memory_times_the_strategy_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import bpmem.measurement.cell

    def out_of_memory(*args: Any, **kwargs: Any) -> Paired:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bpmem.measurement.cell, "time_pairs", out_of_memory)
    spec, step = _tiny()
    columns = bpmem.measurement.cell.time_steps(spec, step, "cpu", warmup=0, repeats=3)
    assert "time_overhead" not in columns and columns["step_time_median_s"] > 0  # timed alone, not an oom row
    assert judge(columns.get("time_overhead"), None, None, columns["time_contended"]).text() == "not paired"


@pytest.mark.slow  # a small sweep, real steps
def test_a_sweep_fills_the_paired_columns_and_the_report_renders(tmp_path: Path) -> None:
    out = run_sweep(tmp_path, "paired", 'name = "paired"\nbatch_sizes = [8]\nrepeats = 2\nwarmup = 1\n'
                    'strategies = ["none", "checkpoint-sqrt"]\n[model]\ndepth = 4\nhidden_dim = 32\ninput_dim = 16\n')
    frame = pd.read_csv(out / "results.csv").set_index("strategy")
    assert set(frame.status) == {"ok"}
    plain, sqrt = frame.loc["none"], frame.loc["checkpoint-sqrt"]
    assert plain.step_cpu_time_median_s > 0 and plain.time_contended in (True, False)
    assert all(pd.isna(plain[c]) for c in ("time_overhead", "time_overhead_low", "time_overhead_high", "time_pairs"))
    assert sqrt.time_contended in (True, False) and sqrt.repeats == 2 and sqrt.step_cpu_time_median_s > 0
    if sqrt.time_contended:  # a loaded machine (a busy CI runner): the pairs stop at the sweep's repeats
        assert sqrt.time_pairs == 2
    else:  # enough pairs for an interval, which holds the median
        assert 6 <= sqrt.time_pairs <= MAX_PAIRS
        assert sqrt.time_overhead_low <= sqrt.time_overhead <= sqrt.time_overhead_high
    report = (out / "report.md").read_text()
    line = next(r for r in report.split("## Summary per strategy")[1].splitlines() if r.startswith("| checkpoint-sqrt"))
    verdict = judge(sqrt.time_overhead, sqrt.time_overhead_low, sqrt.time_overhead_high, sqrt.time_contended)
    assert verdict.text() in line.split("|")[4]
