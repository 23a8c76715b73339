"""Mixed precision (``--amp bfloat16|float16``): the step as GPU training runs it.

- ``torch.autocast`` wraps the forward and the loss (not backward, not the optimizer): the
  parameters stay float32, matmuls run in the low-precision dtype on a cast of each weight
  that autocast caches for the region, and ops on autocast's float32 list (the loss's
  log-softmax, for one) run in float32;
- with float16, a ``torch.amp.GradScaler`` scales J before backward, unscales the float32
  gradients and skips a step whose gradients overflowed (bfloat16 has float32's range and
  needs none);
- inference runs its forward under the same autocast.

The precision travels with the optimizer (``make_optimizer`` attaches it), so every step
function that is handed an optimizer runs the same step, and nothing else has to pass it on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from bpmem.torch_private import is_fake

T = TypeVar("T")


@dataclass
class Precision:
    """How one step is run: ``dtype`` None for full precision."""

    dtype: torch.dtype | None = None
    scaler: Any = None  # a GradScaler with float16, made for the device of the first step
    skipped_last_step: bool = False  # the scaler found an overflow and skipped the optimizer

    def region(self, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
        """Autocast for the forward and the loss on ``device`` (nothing at full precision)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.dtype)

    def backward(self, objective: torch.Tensor) -> None:
        (self.scaler.scale(objective) if self.scaler is not None else objective).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        if any(is_fake(p) for group in optimizer.param_groups for p in group["params"]):
            # the scaler skips a step whose gradients overflowed, which it reads with .item();
            # fake tensors have no values, so the estimate takes the step (the usual case),
            # with the same unscale_ before it and update after it
            self.scaler.unscale_(optimizer)
            optimizer.step()
            self.scaler.update()
            return
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        self.skipped_last_step = self.scaler.get_scale() < scale  # update() backs off after an overflow


# GradScaler starts at 2**16 and halves after every overflow: 64 halvings reach any scale a
# finite gradient needs
SETTLING_STEPS = 64


def settle(train_once: Callable[[], T], optimizer: Any) -> T:
    """Run ``train_once()`` until its step is not skipped (at most ``SETTLING_STEPS`` times) and
    return what that run returned. As the warm-up: the measured steps start from the steady
    state, optimizer state made. Around a measured step: the step measured is one that
    updates, as the estimate's is, not one whose gradients overflowed at a scale the scaler
    then backs off from. Only float16's scaler ever skips; any other precision runs once."""
    precision = precision_of(optimizer)
    for _ in range(SETTLING_STEPS):
        outcome = train_once()
        if not precision.skipped_last_step:
            break
    return outcome


def precision_for(amp: str, device: torch.device | str) -> Precision:
    """The precision ``--amp`` names, on ``device``."""
    if amp == "none":
        return Precision()
    dtype = getattr(torch, amp)
    scaler = torch.amp.GradScaler(torch.device(device).type) if dtype == torch.float16 else None
    return Precision(dtype, scaler)


def precision_of(optimizer: Any) -> Precision:
    """The precision ``make_optimizer`` attached (full precision for any other optimizer)."""
    return getattr(optimizer, "bpmem_precision", None) or Precision()
