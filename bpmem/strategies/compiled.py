"""``compile-budget``: PyTorch's own answer, ``torch.compile`` with an activation budget.

AOTAutograd's min-cut partitioner (``min_cut_rematerialization_partition``) decides which
forward values to save and which to recompute in backward so that the saved bytes meet
``torch._functorch.config.activation_memory_budget`` (a fraction of what eager would save).
The backend here is ``aot_eager_decomp_partition`` rebuilt from its parts, so that its
forward and backward graphs can be run under ``FlopCounterMode`` on request: dynamo runs
eagerly whenever a dispatch mode is already active around the compiled call, so a counter
outside would only ever see the uncompiled model.

What this strategy retains is measured by ``SavedTensorProbe``: the compiled function
saves through ``ctx.save_for_backward``, which saved-tensor hooks see. Its peak is the
live-tensor probe's, like every other strategy's: the probe's dispatch mode declares
``ignore_compile_internals``, so dynamo compiles as if it were absent and the probe sees
every aten op of the compiled graphs as they run, and the probe's graph-hooking function
mode steps aside around the compiled call (``graph_hooks_set_aside``), so that dynamo does
not trace into it. The CPU allocator's own trace (``AllocatorTraceProbe``) agrees to the
byte (``tests/test_compile_budget.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bpmem.probes.live_modes import graph_hooks_set_aside
from bpmem.torch_private import boxed, min_cut_backend, partitioner_memory_budget, reset_compiler_caches


class _FlopTally:
    """FLOPs of the compiled graphs' runs while ``counting()`` is open."""

    def __init__(self) -> None:
        self.active = False
        self.total = 0

    @contextlib.contextmanager
    def counting(self):
        self.active, self.total = True, 0
        try:
            yield self
        finally:
            self.active = False


def _counting_compiler(tally: _FlopTally):
    from torch.utils.flop_counter import FlopCounterMode

    def compiler(graph: torch.fx.GraphModule, example_inputs: Any):
        def run(*args: Any) -> Any:
            if not tally.active:
                return graph(*args)
            with FlopCounterMode(display=False) as counter:
                out = graph(*args)
            tally.total += int(counter.get_total_flops())
            return out

        return boxed(run)

    return compiler


def _backend(tally: _FlopTally):
    return min_cut_backend(_counting_compiler(tally), _counting_compiler(tally))


@dataclass
class CompiledBudgetStrategy:
    """The model compiled once per model object, always run with the budget in force (a
    recompile, e.g. for a new batch size, then meets the same budget)."""

    budget: float = 0.5
    name: str = "compile-budget"
    tally: _FlopTally = field(default_factory=_FlopTally)
    _compiled: dict[int, Any] = field(default_factory=dict)

    def forward(self, model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        compiled = self._compiled.get(id(model))
        if compiled is None:
            reset_compiler_caches()  # fresh caches: earlier models must not share guards or limits
            compiled = self._compiled[id(model)] = torch.compile(model, backend=_backend(self.tally))
        with partitioner_memory_budget(min(self.budget, 1.0)), graph_hooks_set_aside():
            return compiled(x)

    def params(self) -> dict[str, Any]:
        return {"budget": self.budget}
