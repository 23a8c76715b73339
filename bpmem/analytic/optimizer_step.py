"""``optimizer.step()`` of torch.optim, replayed: the temporaries each implementation makes,
in the order the live-tensor probe sees them (PyTorch 2.x, CPU kernels).

The optimizer state itself (momentum buffers, Adam's moments) is live before the step and
after it; what a replay adds is the step's own scratch:

- **fused** (``_fused_sgd_``, ``_fused_adam_``, ``_fused_adamw_``): one kernel per group,
  updating in place: nothing.
- **for-loop** (one parameter at a time):
  - SGD, SGD with momentum: with coupled weight decay, ``grad.add(param, alpha=wd)`` makes a
    parameter-sized copy, dropped before the next parameter;
  - Adam, AdamW: ``denom = (exp_avg_sq.sqrt() / c).add_(eps)`` makes ``sqrt`` and ``denom``
    (the division's result); ``sqrt`` dies at once, ``denom`` when the next parameter's
    ``denom`` is bound; Adam's weight decay adds a gradient copy that dies after that
    parameter's ``addcdiv_``. AdamW decays the weight in place.
- **foreach** (one kernel per op over every parameter):
  - SGD: weight decay's ``_foreach_add`` makes a copy of every gradient at once, freed
    (last parameter first, as a list is freed) after the update;
  - Adam, AdamW: the step count is incremented by a 0-dim tensor made for the purpose;
    Adam's weight decay copies every gradient, freed after the moments are updated; then
    ``_foreach_sqrt`` makes a square root of every ``exp_avg_sq`` at once, freed at the end.

``params`` lists (name, bytes) in ``model.parameters()`` order.
"""

from __future__ import annotations

from bpmem.analytic.ledger import Ledger

ADAMS = ("adam", "adamw")


def replay_optimizer_step(r: Ledger, optimizer: str, impl: str, weight_decay: float,
                          params: list[tuple[str, int]], scalar_bytes: int = 4) -> None:
    """Add the step's temporaries to ``r`` (its phase already set)."""
    coupled = weight_decay != 0 and optimizer != "adamw"  # AdamW's decay touches the weight only
    if impl == "fused":
        return
    if impl == "foreach":
        if optimizer in ADAMS:
            r.alloc("step increment", scalar_bytes)  # torch.tensor(1.0), added to every step count
            r.free("step increment")
        if coupled:
            _all_at_once(r, "decayed grad", params)
        if optimizer in ADAMS:
            _all_at_once(r, "sqrt", params)
        return
    previous = None  # Adam's denom of the parameter before
    for name, nbytes in params:
        if coupled:
            r.alloc(f"decayed grad {name}", nbytes)
        if optimizer in ADAMS:
            r.alloc(f"sqrt {name}", nbytes)
            r.alloc(f"denom {name}", nbytes)
            r.free(f"sqrt {name}", *([previous] if previous else []))
            previous = f"denom {name}"
        if coupled:
            r.free(f"decayed grad {name}")
    if previous:
        r.free(previous)


def _all_at_once(r: Ledger, what: str, params: list[tuple[str, int]]) -> None:
    """One foreach op's outputs, one per parameter, appearing together; freed last first."""
    for index, (name, nbytes) in enumerate(params):
        r.alloc(f"{what} {name}", nbytes, record=index == len(params) - 1)
    r.free(*(f"{what} {name}" for name, _ in reversed(params)))
