"""PyTorch's eval fast path for ``nn.TransformerEncoder``, and what a dry run can follow of it.

In eval mode, without autograd, ``TransformerEncoderLayer`` runs one fused kernel
(``_transformer_encoder_layer_fwd``) in place of its attention and feed-forward ops, and fake
tensors run it too. Given a ``src_key_padding_mask``, ``TransformerEncoder`` also packs its
input into a nested tensor that drops the padded positions; those sizes come from the mask's
values, which fake tensors do not have, and nested tensors have no fake kernels. So on fake
tensors ``dense_encoders`` turns the nested packing off (``use_nested_tensor``) for the step:
the layers still take their fused path, on the padded input, and the watch records that a
mask was given, so the estimate can say it ran dense where a real forward runs nested.

The fast path's conditions also include "no ``__torch_function__`` anywhere", so a probe must
not hold a function mode over an inference forward (``measure_inference_peak``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from bpmem.torch_private import fake_mode_active

NESTED_CAVEAT = ("in eval mode a TransformerEncoder given a padding mask runs on nested tensors, whose sizes come "
                 "from the mask's values: the dry run, without values, ran it dense; check with bpmem measure --model")


@dataclass
class NestedWatch:
    """Whether a TransformerEncoder was asked to pack a masked input that the dry run ran dense."""

    ran_dense: bool = False


@contextlib.contextmanager
def dense_encoders(model: nn.Module) -> Iterator[NestedWatch]:
    """On fake tensors, every ``TransformerEncoder`` of ``model`` without nested packing for
    the block (put back after); on real tensors, nothing changes."""
    watch = NestedWatch()
    encoders = [m for m in model.modules() if isinstance(m, nn.TransformerEncoder) and m.use_nested_tensor]
    if not fake_mode_active() or not encoders:
        yield watch
        return

    def note_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("src_key_padding_mask", args[2] if len(args) > 2 else None)
        if mask is not None and not module.training:
            watch.ran_dense = True

    handles = [m.register_forward_pre_hook(note_mask, with_kwargs=True) for m in encoders]
    for encoder in encoders:
        encoder.use_nested_tensor = False
    try:
        yield watch
    finally:
        for encoder, handle in zip(encoders, handles, strict=True):
            encoder.use_nested_tensor = True
            handle.remove()
