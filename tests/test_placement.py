"""Where every cell runs, on machines with 0, 1 and 8 GPUs, described rather than owned:
``bpmem.strategies.placement.place`` for every cell of the shipped configs, the sweep's skipped rows,
``--jobs``' plan, and the torchrun worker on a machine that claims GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bpmem.strategies.placement import DEVICES, ONE_DEVICE, RANKS, Machine, job_plan, parse_device, place
from bpmem.sweep.config import ConfigError, SweepConfig, load_config, resolve_devices
from bpmem.sweep.environment import environment
from bpmem.sweep.run import run_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
NO_GPU = Machine(gpu_count=0, cuda_available=False)
ONE_GPU = Machine(gpu_count=1, cuda_available=True)
EIGHT_GPUS = Machine(gpu_count=8, cuda_available=True)
MACHINES = {"0 GPUs": NO_GPU, "1 GPU": ONE_GPU, "8 GPUs": EIGHT_GPUS}


def placements(config_name: str | None, machine: Machine) -> list[tuple[object, object]]:
    """(cell, placement) for every cell of a shipped config (None: the default sweep) on
    ``machine``; a config naming a GPU the machine lacks raises ConfigError."""
    config = load_config(CONFIGS / f"{config_name}.toml" if config_name else None)
    cells = config.cells(resolve_devices(config.devices, machine))
    return [(cell, place(cell.device, cell.step.world_size, cell.step.strategy.placement, machine))
            for cell in cells]


@pytest.mark.parametrize("machine", MACHINES.values(), ids=MACHINES.keys())
@pytest.mark.parametrize("config_name", [None, "split", "checkpoint", "models", "steps"])
def test_cpu_configs_run_on_the_cpu_and_gloo_whatever_the_gpus(config_name: str | None, machine: Machine) -> None:
    """split.toml's distributed cells say cpu: on any machine, every rank and stage is on
    the CPU, ranks talk gloo; the single-device cells are on the CPU in one process."""
    found = placements(config_name, machine)
    assert found
    for cell, placement in found:
        layout = cell.step.strategy.placement
        width = 1 if layout == ONE_DEVICE else cell.step.world_size
        assert placement.devices == ("cpu",) * width, cell.cell_id
        assert placement.backend == ("gloo" if layout == RANKS else None), cell.cell_id
    if config_name == "split":  # it holds all three layouts
        assert {cell.step.strategy.placement for cell, _ in found} == {ONE_DEVICE, RANKS, DEVICES}


@pytest.mark.parametrize("config_name", ["gpu", "gpu_seed", "gpu_steps", "gpu_compile"])
def test_gpu_configs_by_gpu_count(config_name: str) -> None:
    with pytest.raises(ConfigError, match="devices: device cuda:0 needs a GPU; CUDA is not available"):
        placements(config_name, NO_GPU)
    for machine in (ONE_GPU, EIGHT_GPUS):  # devices = ["cuda"] is cuda:0, whatever else is there
        found = placements(config_name, machine)
        assert found and all(p.devices == ("cuda:0",) and p.backend is None for _, p in found)


def test_a_cuda_cell_of_two_ranks_needs_two_gpus() -> None:
    assert place("cuda", 2, RANKS, ONE_GPU).skipped == (
        "world_size 2 needs 2 GPUs (one per rank), this machine has 1 GPU")
    assert place("cuda", 2, DEVICES, ONE_GPU).skipped == (
        "world_size 2 needs 2 GPUs (one per stage), this machine has 1 GPU")
    assert place("cuda", 2, RANKS, NO_GPU).skipped == "device cuda needs a GPU; CUDA is not available, " \
                                                      "this machine has 0 GPUs"
    # CUDA works but no GPU is visible (CUDA_VISIBLE_DEVICES="")
    assert "no GPU is visible" in place("cuda", 1, ONE_DEVICE, Machine(0, True)).skipped
    eight = place("cuda", 2, RANKS, EIGHT_GPUS)
    assert (eight.devices, eight.backend) == (("cuda:0", "cuda:1"), "nccl")
    assert place("cuda:6", 2, RANKS, EIGHT_GPUS).devices == ("cuda:6", "cuda:7")
    assert place("cuda:7", 2, DEVICES, EIGHT_GPUS).skipped == (
        "world_size 2 needs 2 GPUs from cuda:7 (one per stage), this machine has 8 GPUs")
    assert place("cuda:3", 1, ONE_DEVICE, ONE_GPU).skipped.startswith("device cuda:3 does not exist")
    # a single-device strategy ignores world_size: it is one process on one device
    assert place("cuda:0", 1, ONE_DEVICE, ONE_GPU).devices == ("cuda:0",)


def test_devices_auto_and_bad_names() -> None:
    assert resolve_devices(("auto",), EIGHT_GPUS) == tuple(f"cuda:{i}" for i in range(8))
    assert resolve_devices(("cpu", "cuda", "cuda:0"), ONE_GPU) == ("cpu", "cuda:0")
    with pytest.raises(ConfigError, match="'auto' found no GPU.*allowed here: cpu$"):
        resolve_devices(("auto",), NO_GPU)
    with pytest.raises(ConfigError, match="cuda:1 does not exist.*allowed here: cpu, cuda:0$"):
        resolve_devices(("cuda:1",), ONE_GPU)
    with pytest.raises(ValueError, match="device: 'gpu' is not allowed; allowed: cpu, cuda, cuda:N"):
        parse_device("gpu")


def test_jobs_never_share_a_gpu() -> None:
    series = [("cpu",), ("cuda:0",), ("cuda:1",), ("cpu",), ("cuda:0", "cuda:1"), ("cuda:0",), ("cpu",), ()]
    assert job_plan(series, 2) == [0, 0, 1, 1, None, 0, 0, 1]
    assert job_plan(series, 8) == [0, 0, 1, 1, None, 0, 2, 3]
    # one GPU, two jobs: its series all go to job 0; the CPU's are dealt to both
    assert job_plan([("cuda:0",), ("cuda:0",), ("cpu",), ("cpu",)], 2) == [0, 0, 0, 1]


def test_the_sweep_skips_a_cuda_cell_it_cannot_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine described with one GPU, a CUDA DDP cell of two ranks is skipped, one
    row per rank, naming the GPU count; nothing is launched (this machine has no GPU at all,
    so a launch could only fail). The GPU's name is the one real CUDA call left: patched."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    config = SweepConfig(batch_sizes=(8,), model=((("depth", (2,)),),),
                         strategies=(("ddp", (("world_size", 2),)), ("model-parallel", (("world_size", 2),))))
    outcome = run_sweep(config, ("cuda:0",), tmp_path, "t", quiet=True, machine=ONE_GPU)
    assert outcome.statuses == {"skipped": 4}
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 5
    for line in rows[1:]:
        assert "world_size 2 needs 2 GPUs" in line and "this machine has 1 GPU" in line


def test_environment_columns_name_the_cells_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Fake GPU {torch.device(device).index}")
    env = environment("cuda:3")
    assert env["device"] == "cuda:3" and env["device_name"] == "Fake GPU 3"
    assert environment("cpu")["device"] == "cpu" and not environment("cpu")["device_name"].startswith("Fake")
    assert env["cuda_version"] == (torch.version.cuda or "")


@pytest.mark.slow
def test_the_worker_keeps_a_cpu_cell_on_the_cpu_when_gpus_are_claimed(tmp_path: Path) -> None:
    """torchrun with torch told there are 8 GPUs (sitecustomize patches torch.cuda): a cpu
    cell still runs both ranks on the CPU over gloo. The worker once took cuda:LOCAL_RANK
    and NCCL whenever CUDA looked available, and failed here."""
    (tmp_path / "sitecustomize.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: 8\n")
    cell = {"spec": {"input_dim": 16, "hidden_dim": 16, "output_dim": 4, "depth": 2},
            "step": {"strategy": "ddp", "world_size": 2, "batch_size": 8}, "device": "cpu"}
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", ""),
                                                        str(Path(__file__).resolve().parents[1])])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "bpmem.worker", "--cell", json.dumps(cell), "--out", str(out), "--repeats", "1",
                           "--warmup", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    claimed = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert claimed.stdout.strip() == "8"  # the patch did reach the ranks' interpreter
    rows = json.loads(out.read_text())
    assert [(row["rank"], row["device"]) for row in rows] == [(0, "cpu"), (1, "cpu")]


def test_a_cuda_oom_releases_memory_and_skips_the_larger_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA cell (one GPU, described) whose measurement raises torch.cuda.OutOfMemoryError:
    the row is ``oom`` with CUDA's message, the caching allocator is emptied, the larger
    batch of the series is skipped without being tried, and the predictions stay."""
    import torch

    import bpmem.measurement.cell
    from bpmem.strategies.registry import make_step
    from bpmem.sweep.config import Cell
    from bpmem.sweep.run import run_series

    tried, emptied = [], []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    real = bpmem.measurement.cell.measure

    def out_of_memory(spec, step, device="cpu", **kwargs):
        if kwargs.get("fake"):  # the CUDA prediction's dry run, on fake tensors
            return real(spec, step, device=device, **kwargs)
        tried.append((step.batch_size, device))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bpmem.measurement.cell, "measure", out_of_memory)
    from bpmem.spec import MLPSpec

    cells = [Cell(MLPSpec(depth=1), make_step(batch_size=batch), "cuda:0") for batch in (64, 128)]
    rows = [row for rows in run_series(cells, "t", environment("cuda:0"), SweepConfig(), machine=ONE_GPU)
            for row in rows]
    assert tried == [(64, "cuda:0")] and emptied
    assert [row["status"] for row in rows] == ["oom", "skipped"]
    assert rows[0]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert rows[1]["error"] == "a smaller batch of this series ran out of memory"
    # the CUDA view of the prediction is there for both: 512 B blocks, at least the peak
    for row in rows:
        assert row["predicted_cuda_allocated_bytes"] >= row["predicted_peak_bytes"] > 0


def test_each_cuda_cell_starts_from_an_emptied_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CUDA cells that both succeed: the caching allocator is emptied before each one is
    measured, so a row's max_memory_reserved is its own cell's, not the sum of the cache the
    cells before it left (which is how the committed H200 sweeps read it: 79.7 MB, then
    180 MB, ..., 335 MB down one run). Before the fix the cache was emptied only after a failure."""
    import torch

    import bpmem.measurement.cell
    from bpmem.spec import MLPSpec
    from bpmem.strategies.registry import make_step
    from bpmem.sweep.config import Cell
    from bpmem.sweep.run import run_series

    emptied: list[bool] = []
    emptied_at_measure: list[int] = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    real = bpmem.measurement.cell.measure

    def measured_on_the_cpu(spec, step, device="cpu", **kwargs):
        if kwargs.get("fake"):  # the CUDA prediction's dry run, on fake tensors
            return real(spec, step, device=device, **kwargs)
        emptied_at_measure.append(len(emptied))
        return real(spec, step, device="cpu")

    monkeypatch.setattr(bpmem.measurement.cell, "measure", measured_on_the_cpu)
    monkeypatch.setattr(bpmem.measurement.cell, "time_steps", lambda *args, **kwargs: {})
    cells = [Cell(MLPSpec(depth=1), make_step(batch_size=batch), "cuda:0") for batch in (64, 128)]
    rows = [row for rows in run_series(cells, "t", environment("cuda:0"), SweepConfig(), machine=ONE_GPU)
            for row in rows]
    assert [row["status"] for row in rows] == ["ok", "ok"]
    # one emptying before the first cell, and a new one before the second
    assert len(emptied_at_measure) == 2 and 1 <= emptied_at_measure[0] < emptied_at_measure[1]


def test_the_cuda_probe_resets_then_reads_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """CudaProbe on cuda:1: synchronise, reset the peak, read the baseline on entry;
    synchronise, then read the peaks on exit; every call on the probe's own device."""
    import torch

    from bpmem.probes import CudaProbe

    calls: list[tuple[str, object]] = []

    def recorder(name: str, value: int = 0):
        def call(device=None):
            calls.append((name, device))
            return value
        return call

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, value in [("synchronize", 0), ("reset_peak_memory_stats", 0), ("memory_allocated", 1024),
                        ("max_memory_allocated", 5120), ("max_memory_reserved", 2 << 20)]:
        monkeypatch.setattr(torch.cuda, name, recorder(name, value))
    with CudaProbe("cuda:1") as probe:
        assert [name for name, _ in calls] == ["synchronize", "reset_peak_memory_stats", "memory_allocated"]
    assert [name for name, _ in calls[3:]] == ["synchronize", "max_memory_allocated", "max_memory_reserved"]
    assert {device for _, device in calls} == {torch.device("cuda:1")}
    assert probe.result() == {"cuda_max_allocated_bytes": 5120, "cuda_max_reserved_bytes": 2 << 20,
                              "cuda_baseline_bytes": 1024}


def test_measure_api_reads_the_gpu_of_the_model_not_of_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """bpmem.measure on a CPU model adds no CUDA figures, even where CUDA is in use."""
    import torch

    import bpmem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    model = torch.nn.Linear(8, 4)
    with bpmem.measure(model, inputs=[torch.ones(2, 8)]) as measured:
        model(torch.ones(2, 8)).sum().backward()
    assert measured.cuda_max_allocated_bytes is None and "cuda_max_allocated_bytes" not in measured.figures()
