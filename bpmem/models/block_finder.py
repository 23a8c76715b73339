"""Finding the ordered blocks of a model that names none: the chain that checkpointing cuts.

Transformer libraries keep their repeated layers in one ``nn.ModuleList`` (Hugging Face's
``model.layers``, ``transformer.h``, ``encoder.layer``, ``vit.encoder.layer``), so the rule is:
the longest ``ModuleList`` whose children are all of one class, at least two of them. Where
two are equally long (T5's ``encoder.block`` and ``decoder.block``), the first in the model's
order is taken, and the reason says so: a chain of segments must be one list, because the
model calls the second list's first block on something else than the first list's last
output. ``--blocks PATH`` names another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FoundBlocks:
    """The ``ModuleList`` taken as the chain, and why it was taken."""

    path: str
    count: int
    block_class: str
    why: str


def find_blocks(model: Any) -> FoundBlocks | None:
    """The longest one-class ``ModuleList`` of ``model`` (two blocks or more), or None."""
    from torch import nn

    candidates = []
    for path, module in model.named_modules():
        children = list(module.children()) if isinstance(module, nn.ModuleList) else []
        if len(children) >= 2 and len({type(child) for child in children}) == 1:
            candidates.append((path, len(children), type(children[0]).__name__))
    if not candidates:
        return None
    longest = max(count for _, count, _ in candidates)
    tied = [c for c in candidates if c[1] == longest]
    path, count, name = tied[0]
    why = f"the longest ModuleList of one class ({count} {name})"
    if len(tied) > 1:
        others = ", ".join(p for p, _, _ in tied[1:])
        why += f"; {others} as long, the first in the model's order taken (--blocks PATH names another)"
    return FoundBlocks(path, count, name, why)
