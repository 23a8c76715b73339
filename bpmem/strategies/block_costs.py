"""What each block of a user's chain costs, measured, for planners that need bytes and FLOPs
(``checkpoint-budget``): the MLP's costs come from arithmetic (``bpmem.analytic.rules``), a
user's model has none, so one plain forward is watched instead.

During that forward, with the ``SavedTensorProbe``:
- ``boundary_bytes[j]``: the storage of block j's input, which a checkpoint keeps;
- ``internal_bytes[j]``: what block j saves in a plain run, less that input (it may save
  its input or not, so this can be negative: the plain cost is their sum either way);
- ``forward_flops[j]``: block j's FLOPs, counted by ``torch.utils.flop_counter``;
- ``outside_bytes``: what the model saves outside the blocks (embeddings, the head).
It runs in the warm-up step, on the step's own model and batch (fake or real), so it costs
one extra forward and no memory that outlives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bpmem.analytic.planner import ChainCosts
from bpmem.probes.saved import SavedTensorProbe


@dataclass(frozen=True)
class MeasuredChain:
    costs: ChainCosts
    outside_bytes: int  # saved outside the blocks, in the model's forward (the loss is not run)

    @property
    def plain_bytes(self) -> int:
        """What the plain forward saves in all."""
        return self.outside_bytes + sum(self.costs.boundary_bytes) + sum(self.costs.internal_bytes)


def measure_chain(model: nn.Module, forward: Callable[[nn.Module, Any], Any], x: Any,
                  chain: list[list[nn.Module]]) -> MeasuredChain:
    """Run ``forward(model, x)`` once, plainly, and cost each block of ``chain``."""
    names = {id(module): name for name, module in model.named_modules()}
    boundary = [0] * len(chain)
    flops = [0] * len(chain)
    handles = []
    for j, block in enumerate(chain):
        counter = FlopCounterMode(display=False)

        def enter(module: nn.Module, args: tuple[Any, ...], j: int = j, counter: Any = counter) -> None:
            first = args[0] if args else None
            boundary[j] = first.untyped_storage().nbytes() if isinstance(first, torch.Tensor) else 0
            counter.__enter__()

        def leave(module: nn.Module, args: Any, out: Any, j: int = j, counter: Any = counter) -> None:
            counter.__exit__(None, None, None)
            flops[j] = counter.get_total_flops()

        handles.append(block[0].register_forward_pre_hook(enter))
        handles.append(block[-1].register_forward_hook(leave))
    probe = SavedTensorProbe(model)
    try:
        with probe:
            forward(model, x)
    finally:
        for handle in handles:
            handle.remove()
    saved = {entry["name"]: entry["saved_bytes"] for entry in probe.per_layer()}
    inside = [sum(n for label, n in saved.items() if any(_within(label, names.get(id(m), "")) for m in block))
              for block in chain]
    internal = tuple(total - boundary[j] for j, total in enumerate(inside))
    outside = sum(saved.values()) - sum(inside)
    return MeasuredChain(ChainCosts(tuple(boundary), internal, tuple(flops)), outside)


def _within(label: str, path: str) -> bool:
    """Whether a per-layer label ("blocks.0.ln1.LayerNorm") lies under module ``path``."""
    return bool(path) and (label == path or label.startswith(path + "."))
