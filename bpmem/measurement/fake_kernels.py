"""Where a fake tensor's storage differs from the one the device's own kernel returns, and the
dispatch mode that makes the fake one match, so an estimate counts what a real step holds.

Fake tensors take their sizes from meta kernels, which allocate exactly the output. A few
real kernels do not. On the CPU, ``mse_loss``, ``smooth_l1_loss``, ``binary_cross_entropy``
and ``soft_margin_loss`` with a reduction compute the elementwise loss into a buffer and
return the 0-d result on that buffer's storage: the loss of a (B, 256) float batch holds
1,024 B per row until it is freed, where the meta kernel holds 4 B.
``tests/test_fake_kernels.py`` compares each entry with the real kernel, so a PyTorch that
changes this fails a test rather than an estimate. CUDA is not listed: not measured yet.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bpmem.torch_private import TorchDispatchMode

# op -> the device types whose reduced result keeps the unreduced buffer's storage
KEEPS_UNREDUCED_STORAGE: dict[str, frozenset[str]] = {
    name: frozenset({"cpu"}) for name in ("mse_loss", "smooth_l1_loss", "binary_cross_entropy", "soft_margin_loss")
}


def real_storage_nbytes(op: str, args: tuple[Any, ...], out: Any) -> int | None:
    """Bytes of the storage the device's kernel gives ``out``, where the meta kernel's differs
    (None where they agree)."""
    devices = KEEPS_UNREDUCED_STORAGE.get(op)
    if devices is None or not isinstance(out, torch.Tensor) or out.dim() != 0 or out.device.type not in devices:
        return None
    shape = torch.broadcast_shapes(args[0].shape, args[1].shape)  # the elementwise loss's shape
    return math.prod(shape) * out.element_size()


class DeviceStorageSizes(TorchDispatchMode):
    """Enter it above ``FakeTensorMode``: each listed op's fake output gets the real size."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # as the live probe's: torch.compile compiles past it and runs its graphs under it
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        nbytes = real_storage_nbytes(str(func.overloadpacket.__name__), args, out)
        if nbytes is not None:
            out.untyped_storage().resize_(nbytes)  # a fake storage: resizing allocates nothing
        return out
