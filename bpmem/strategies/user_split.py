"""Your own model (``--model``) under the split strategies: what DDP, FSDP and the pipelines
need of it, found on its skeleton (the model built on the meta device: every module and
parameter shape, no memory), so a refusal comes before any process starts.

- ``ddp`` takes any model: a whole replica per rank.
- ``fsdp`` takes any model: one ``fully_shard`` unit per ordered block that holds parameters
  (``workload.blocks``: the children of an ``nn.Sequential``, or of the ``ModuleList`` at
  ``--blocks``), then the root; a model without blocks is one unit, the root.
- The pipelines cut a chain, and only an ``nn.Sequential`` model *is* one: its forward is its
  children one after another. Blocks inside another forward (the GPT example's) are not:
  their model does more around them (embeddings, a residual stream, a tied head).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def skeleton(workload: Any) -> nn.Module:
    """The model built on the meta device: its structure, no data, no memory."""
    with torch.device("meta"):
        return workload.build("meta", seed=None)


def parameter_count(workload: Any) -> int:
    """How many parameters ``model.parameters()`` yields (a tied one once)."""
    return len(list(skeleton(workload).parameters()))


def sequential_length(workload: Any, strategy: str) -> int:
    """The number of children of the model, which has to be an ``nn.Sequential``; else a
    ``ValueError`` on ``model`` that says what is needed."""
    model = skeleton(workload)
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model: {strategy} needs an nn.Sequential model, whose children it cuts into stages; "
                         f"{workload.name} returns a {type(model).__name__}; allowed with --model: an "
                         "nn.Sequential model, or ddp or fsdp (any model)")
    return len(model)


def owned_indices(workload: Any, ranges: list[tuple[int, int]]) -> list[int]:
    """Indices, in ``model.parameters()`` order, of the parameters of the children in
    ``ranges`` ([start, end) each, a rank's stages), in the order the rank holds them."""
    model = skeleton(workload)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    children = list(model.children())
    # each stage is one container of its children, whose parameters() counts a shared one once
    return [index[id(p)] for start, end in ranges for p in nn.ModuleList(children[start:end]).parameters()]


def fsdp_units(workload: Any, model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one before the root: each ordered block that holds
    parameters (a parameter-free one, an activation, has nothing to gather); none where the
    model has no blocks. A ``--blocks`` path that does not exist is the user's error, said."""
    if not isinstance(model, nn.Sequential) and getattr(workload, "blocks_path", None) is None:
        return []
    return [module for block in workload.blocks(model) for module in block
            if next(module.parameters(), None) is not None]
