"""``bpmem.measure``: the figures of any block of PyTorch code, exact and deterministic.

    import bpmem
    with bpmem.measure(model) as m:        # model optional; it names modules by path
        loss = model(x).sum(); loss.backward(); optimizer.step()
    m.saved_activation_bytes, m.peak_bytes, m.peak_breakdown, m.top_saved(), m.top_live()

The two figures, for any code (the pytest plugin and its fixture report these same ones):

- ``saved_activation_bytes``: the largest total, at any moment in the block, of the distinct
  storages that autograd holds for a backward. A storage counts once however many views or
  graphs hold it, from the moment autograd saves it until autograd lets go (the backward that
  used it ran, or the graph was freed). Parameters, trainable or frozen (any
  ``nn.Parameter``, or a view of one), and the buffers of every module that runs (BatchNorm's
  running statistics) never count; inputs that autograd saves do.
- ``peak_bytes``: the largest total of storages allocated inside the block and alive at the
  same moment. A view of an older storage, or an in-place op on one, allocates nothing.

``peak_breakdown`` splits the storages live at that peak: ``activations`` (held by autograd
then), ``gradients`` (what became a parameter's ``.grad``), ``optimizer`` (state that
``optimizer`` created in the block) and ``temporaries`` (the rest). ``resident`` gives what
existed before the block and is not in ``peak_bytes``: ``parameters``, ``frozen_parameters``
and ``buffers`` of ``model``, and ``inputs`` if given.

Measurements nest: an inner ``measure`` (or the plugin's fixture inside a marked test)
leaves both figures of the outer one right. What it cannot see: memory outside tensor
storages (kernel scratch such as oneDNN or cuBLAS workspaces, allocator rounding; use
``CudaProbe`` on a GPU), and tensors a custom autograd Function stashes on ``ctx`` itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bpmem.probes import LiveTensorProbe, distinct_storage_bytes, local_tensor
from bpmem.probes.tracking import MODULES, SAVED, Packed, release_callback, storage_id
from bpmem.torch_private import view_base


@dataclass(frozen=True)
class Contributor:
    """One storage: its bytes, the module running when it was made or saved, and the op."""

    nbytes: int
    module: str
    op: str

    def __str__(self) -> str:
        return f"{self.module} ({self.op})"


class _HeldTensors:
    """Listens to every saved tensor: what autograd holds now, and the most it held."""

    def __init__(self, excluded: set[int], op_of: Any) -> None:
        self.excluded = excluded  # storage ids of parameters and buffers met so far
        self.op_of = op_of  # storage id -> the aten op that made it in the block ("input" if older)
        self.holders: dict[int, int] = {}  # storage id -> live Packed objects
        self.info: dict[int, Contributor] = {}
        self.held_bytes = 0
        self.peak_bytes = 0
        self.peak_contributors: list[Contributor] = []

    def on_pack(self, tensor: torch.Tensor, packed: Packed) -> None:
        tensor = local_tensor(tensor)
        base = view_base(tensor)
        if isinstance(base, nn.Parameter) or isinstance(tensor, nn.Parameter):
            return
        key = storage_id(tensor)
        if key in self.excluded:
            return
        count = self.holders.get(key, 0)
        self.holders[key] = count + 1
        if count == 0:
            op = self.op_of(key) or _maker(tensor)
            self.info[key] = Contributor(tensor.untyped_storage().nbytes(), MODULES.current(), op)
            self.held_bytes += self.info[key].nbytes
            if self.held_bytes > self.peak_bytes:
                self.peak_bytes = self.held_bytes
                self.peak_contributors = list(self.info.values())
        release_callback(packed, lambda: self._let_go(key))

    def _let_go(self, key: int) -> None:
        count = self.holders.get(key, 0) - 1
        if count > 0:
            self.holders[key] = count
            return
        self.holders.pop(key, None)
        info = self.info.pop(key, None)
        if info is not None:
            self.held_bytes -= info.nbytes


def _maker(tensor: torch.Tensor) -> str:
    """The op that made ``tensor``, from its autograd node (``AddmmBackward0`` -> ``addmm``)."""
    if tensor.grad_fn is None:
        return "input" if tensor.is_leaf else "?"
    return tensor.grad_fn.name().removesuffix("0").removesuffix("Backward").lower()


@dataclass
class Measurement:
    """The figures of one measured block (bytes); filled in when the block ends."""

    saved_activation_bytes: int = 0
    peak_bytes: int = 0
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    resident: dict[str, int] = field(default_factory=dict)
    saved_at_peak: list[Contributor] = field(default_factory=list)
    live_at_peak: list[Contributor] = field(default_factory=list)
    # on CUDA: the caching allocator's peak over the block (a global counter: not nestable)
    cuda_max_allocated_bytes: int | None = None

    def figures(self) -> dict[str, int]:
        out = {"saved_activation_bytes": self.saved_activation_bytes, "peak_bytes": self.peak_bytes}
        if self.cuda_max_allocated_bytes is not None:
            out["cuda_max_allocated_bytes"] = self.cuda_max_allocated_bytes
        return out

    def top_saved(self, n: int = 5) -> list[tuple[str, int]]:
        """The largest saved storages when the saved figure peaked, by module and op."""
        return _grouped(self.saved_at_peak, n)

    def top_live(self, n: int = 5) -> list[tuple[str, int]]:
        """The largest storages alive at the peak, by module and op."""
        return _grouped(self.live_at_peak, n)


def _grouped(items: Iterable[Contributor], n: int) -> list[tuple[str, int]]:
    totals: dict[str, int] = {}
    for item in items:
        totals[str(item)] = totals.get(str(item), 0) + item.nbytes
    return sorted(totals.items(), key=lambda pair: (-pair[1], pair[0]))[:n]


def _cuda_device_of(model: nn.Module | None, inputs: list[torch.Tensor]) -> torch.device | None:
    """The GPU whose allocator the block uses: the device of the model's first CUDA tensor,
    else of the inputs'. With neither given, the current CUDA device if CUDA is in use (the
    block can only be on it). None for a CPU model, on any machine."""
    state = [*model.parameters(), *model.buffers()] if model is not None else []
    for tensor in [*state, *inputs]:
        if tensor.device.type == "cuda":
            return tensor.device
    if model is None and not inputs and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return None


@contextlib.contextmanager
def measure(model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
            inputs: Iterable[torch.Tensor] = (), peak: bool = True) -> Iterator[Measurement]:
    """Measure the block: ``saved_activation_bytes``, ``peak_bytes`` and their attribution
    (see the module docstring for the definitions). ``model`` names modules by path and
    gives the resident parameters and buffers; ``optimizer`` lets its new state be told
    apart; ``inputs`` are counted as resident. All are optional. ``peak=False`` measures the
    saved figure only, at a few percent of the step's time (the peak watches every op)."""
    result = Measurement()
    inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
    excluded: set[int] = set()
    live = LiveTensorProbe(record_timeline=False)
    live.track_ops = True
    live.module_of = MODULES.current  # attribution of every new storage by module path
    # the aten op that made a storage in the block, as the live probe saw it; "input" for an
    # older one; without the live probe (peak=False), "" and the saver falls back to grad_fn
    held = _HeldTensors(excluded, lambda key: (getattr(live.tracked_now(key), "op", "") or "input") if peak else "")
    hooked: dict[int, Any] = {}

    def mark_gradient(param: torch.Tensor) -> None:  # the storage that became param.grad
        tracked = live.tracked_now(storage_id(local_tensor(param.grad)))
        if tracked is not None:
            tracked.role = "gradients"

    def exclude_state(module: nn.Module) -> None:  # parameters and buffers never count
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            excluded.add(storage_id(local_tensor(tensor)))
        for param in module.parameters(recurse=False):
            if param.requires_grad and id(param) not in hooked:
                hooked[id(param)] = param.register_post_accumulate_grad_hook(mark_gradient)

    snapshot: dict[str, Any] = {}

    def on_peak() -> None:  # what autograd held when the live peak was reached
        snapshot["held"] = set(held.holders)

    live.on_peak = on_peak
    cuda = None
    cuda_device = _cuda_device_of(model, inputs)
    if cuda_device is not None:
        from bpmem.probes import CudaProbe

        cuda = CudaProbe(cuda_device)
    with contextlib.ExitStack() as stack:
        if cuda is not None:
            stack.enter_context(cuda)
        stack.enter_context(MODULES.tracking(model))
        MODULES.on_enter.append(exclude_state)
        stack.callback(MODULES.on_enter.remove, exclude_state)
        if model is not None:
            for module in model.modules():
                exclude_state(module)
        stack.enter_context(SAVED.listening(held))
        if peak:
            stack.enter_context(live)
        stack.callback(lambda: [handle.remove() for handle in hooked.values()])
        yield result
    if optimizer is not None:  # state made in the block and kept: the same records as at the peak
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and (tracked := live.tracked_now(storage_id(value))):
                    tracked.role = "optimizer"
    if cuda is not None:
        result.cuda_max_allocated_bytes = cuda.cuda_max_allocated_bytes
    result.saved_activation_bytes = held.peak_bytes
    result.saved_at_peak = held.peak_contributors
    result.peak_bytes = live.peak_bytes
    result.live_at_peak = [Contributor(t.nbytes, t.module, t.op) for t in live.peak_tracked.values()]
    result.peak_breakdown = _breakdown(live, snapshot.get("held", set()))
    if model is not None:
        params = list(model.parameters())
        result.resident = {"parameters": distinct_storage_bytes(p for p in params if p.requires_grad),
                           "frozen_parameters": distinct_storage_bytes(p for p in params if not p.requires_grad),
                           "buffers": distinct_storage_bytes(model.buffers())}
    if inputs:
        result.resident["inputs"] = distinct_storage_bytes(inputs)


def _breakdown(live: LiveTensorProbe, held_at_peak: set[int]) -> dict[str, int]:
    """Split the storages live at the peak: held by autograd then (activations), marked as
    a parameter's gradient or the optimizer's state (roles set as they happened), the rest."""
    out = {"activations": 0, "gradients": 0, "optimizer": 0, "temporaries": 0}
    for key, tracked in live.peak_tracked.items():
        role = "activations" if key in held_at_peak else (tracked.role or "temporaries")
        out[role] += tracked.nbytes
    return out
