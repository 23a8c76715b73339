"""Where a cell runs: one pure function, ``place``, from the cell and a description of the
machine to the device of every rank or stage and the process-group backend, or the reason
it cannot run here.

Every path that puts tensors on a device follows it: the sweep (single-device, torchrun and
model-parallel cells, ``--jobs``, ``devices = "auto"``), the torchrun worker, and
``bpmem measure --device``. Nothing else asks torch which GPUs exist: ``Machine.here`` is the
one place that does, so tests describe a machine with 0, 1 or 8 GPUs instead of needing one.

The rules, all taken from the cell, never from the machine alone:

- a ``cpu`` cell runs on the CPU whatever GPUs the machine has; its ranks talk over gloo;
- a ``cuda:K`` cell of world size W (ranks or stages) needs GPUs K .. K+W-1; rank r runs on
  ``cuda:K+r`` and the ranks talk over NCCL;
- a cell that needs more GPUs than the machine has is skipped, with the count in its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from bpmem.spec import DEVICES, ONE_DEVICE, RANKS  # noqa: F401 - how a strategy's cell is laid out


@dataclass(frozen=True)
class Machine:
    """What ``place`` needs to know of a machine: whether CUDA works, and how many GPUs one
    process sees (after ``CUDA_VISIBLE_DEVICES``)."""

    gpu_count: int = 0
    cuda_available: bool = False

    @property
    def gpus(self) -> int:
        """GPUs that can be used: none where CUDA does not work, whatever the count says."""
        return self.gpu_count if self.cuda_available else 0

    @classmethod
    def here(cls) -> Machine:
        """This process's machine. The only call into ``torch.cuda`` that decides placement;
        it does not initialise CUDA (``device_count`` reads NVML or the driver)."""
        import torch

        available = torch.cuda.is_available()
        return cls(gpu_count=torch.cuda.device_count() if available else 0, cuda_available=available)

    def describe(self) -> str:
        return f"this machine has {self.gpus} GPU{'' if self.gpus == 1 else 's'}"


@dataclass(frozen=True)
class Placement:
    """The outcome of ``place``: one device per rank or stage and the backend of the process
    group (``None`` for a cell that runs in one process), or ``skipped`` saying why not."""

    devices: tuple[str, ...] = ()
    backend: str | None = None
    skipped: str = ""

    @property
    def runs(self) -> bool:
        return not self.skipped

    @property
    def cuda(self) -> bool:
        return any(device.startswith("cuda") for device in self.devices)


def parse_device(device: str) -> tuple[str, int]:
    """("cpu", 0) or ("cuda", index) of ``cpu``, ``cuda`` or ``cuda:N``; ValueError naming the
    allowed forms for anything else (``auto`` is expanded before cells exist)."""
    if device == "cpu":
        return "cpu", 0
    if device == "cuda":
        return "cuda", 0
    kind, _, index = device.partition(":")
    if kind == "cuda" and index.isdigit():
        return "cuda", int(index)
    raise ValueError(f"device: {device!r} is not allowed; allowed: cpu, cuda, cuda:N")


def place(device: str, world_size: int, layout: str, machine: Machine) -> Placement:
    """Where a cell on ``device`` with ``world_size`` ranks or stages runs on ``machine``.

    ``layout`` is the strategy's: ``ONE_DEVICE`` (one process, one device), ``RANKS`` (one
    torchrun process per rank) or ``DEVICES`` (one process, one device per stage)."""
    kind, first = parse_device(device)
    width = 1 if layout == ONE_DEVICE else world_size
    backend = None if layout != RANKS else ("nccl" if kind == "cuda" else "gloo")
    if kind == "cpu":
        return Placement(("cpu",) * width, backend)
    if machine.gpus == 0:
        why = "CUDA is not available" if not machine.cuda_available else "no GPU is visible"
        return Placement(skipped=f"device {device} needs a GPU; {why}, {machine.describe()}")
    needed = first + width
    if needed > machine.gpus:
        if layout == ONE_DEVICE:
            return Placement(skipped=f"device {device} does not exist; {machine.describe()} "
                                     f"(cuda:0 .. cuda:{machine.gpus - 1})")
        what = "ranks" if layout == RANKS else "stages"
        start = f" from cuda:{first}" if first else ""
        return Placement(skipped=f"world_size {world_size} needs {needed - first} GPUs{start} (one per "
                                 f"{what[:-1]}), {machine.describe()}")
    return Placement(tuple(f"cuda:{first + offset}" for offset in range(width)), backend)


def expand_devices(devices: tuple[str, ...], machine: Machine) -> tuple[tuple[str, ...], str]:
    """A config's ``devices`` list on ``machine``: ``auto`` becomes every GPU, ``cuda`` becomes
    ``cuda:0``, duplicates go. Also the first device that is not on this machine, with the
    reason ("" when all are): the caller decides whether that is an error."""
    resolved: list[str] = []
    missing = ""
    for device in devices:
        if device == "auto":
            if machine.gpus == 0:
                missing = missing or f"devices: 'auto' found no GPU; {machine.describe()}"
            resolved.extend(f"cuda:{index}" for index in range(machine.gpus))
            continue
        kind, index = parse_device(device)
        name = "cpu" if kind == "cpu" else f"cuda:{index}"
        placement = place(name, 1, ONE_DEVICE, machine)
        if not placement.runs:
            missing = missing or f"devices: {placement.skipped}"
        resolved.append(name)
    return tuple(dict.fromkeys(resolved)), missing


def devices_here(machine: Machine) -> str:
    """The devices a config may name on ``machine``, for error messages."""
    return ", ".join(["cpu", *(f"cuda:{index}" for index in range(machine.gpus))])


def job_plan(series_devices: list[tuple[str, ...]], jobs: int) -> list[int | None]:
    """Which of ``jobs`` worker processes runs each series, given the devices its cells use.

    Two processes never share a GPU: each GPU's series all go to one job (GPU k to job
    k mod ``jobs``). CPU-only series are dealt round-robin. A series that spans more than one
    GPU (NCCL ranks, model-parallel stages) gets ``None``: it runs on its own, after the
    parallel part, so no other job touches its GPUs while it is measured."""
    plan: list[int | None] = []
    dealt = 0
    for devices in series_devices:
        gpus = sorted({device for device in devices if device.startswith("cuda")})
        if len(gpus) > 1:
            plan.append(None)
        elif gpus:
            plan.append(parse_device(gpus[0])[1] % jobs)
        else:
            plan.append(dealt % jobs)
            dealt += 1
    return plan
