"""Each entry of ``bpmem.measurement.fake_kernels`` against the real kernel: on small real tensors of each
device the entry names, the storage the kernel gives its result has exactly the size the entry
says, and a fake run under ``DeviceStorageSizes`` has that size too.

The table is iterated, so a new entry is covered as soon as it is written; and each entry
must still be needed (the meta kernel's size differs), so a PyTorch that stops keeping the
unreduced buffer fails here rather than in an estimate."""

from __future__ import annotations

import contextlib

import pytest
import torch

from bpmem.measurement.fake_kernels import KEEPS_UNREDUCED_STORAGE, DeviceStorageSizes, real_storage_nbytes
from bpmem.torch_private import fake_tensor_mode

# reduction codes of aten's loss ops (at::Reduction)
NONE, MEAN, SUM = 0, 1, 2
SHAPES = [(5, 7), (3, 256), (9,), (2, 3, 4)]
DTYPES = [torch.float32, torch.float64]

ENTRIES = [(op, device) for op, devices in sorted(KEEPS_UNREDUCED_STORAGE.items()) for device in sorted(devices)]


def _available(device: str) -> bool:
    return device == "cpu" or (device == "cuda" and torch.cuda.is_available())


def _loss(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, reduction: int) -> torch.Tensor:
    """The aten op on an input in (0, 1) and a target in [0, 1] (valid for every loss listed:
    binary_cross_entropy needs probabilities), with the reduction given."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=generator, dtype=dtype).clamp(0.05, 0.95).to(device)
    target = torch.rand(shape, generator=generator, dtype=dtype).to(device)
    return getattr(torch.ops.aten, op).default(x, target, reduction=reduction)


def _fake_loss(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, reduction: int,
               sized: bool) -> int:
    """Bytes of the fake result's storage, with the entry's sizes (``sized``) or the meta kernel's."""
    with fake_tensor_mode(), DeviceStorageSizes() if sized else contextlib.nullcontext():
        x, target = torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)
        return getattr(torch.ops.aten, op).default(x, target, reduction=reduction).untyped_storage().nbytes()


def test_the_table_lists_the_losses_the_module_names() -> None:
    assert {"mse_loss", "smooth_l1_loss", "binary_cross_entropy", "soft_margin_loss"} <= set(KEEPS_UNREDUCED_STORAGE)
    assert all(devices for devices in KEEPS_UNREDUCED_STORAGE.values())


@pytest.mark.parametrize("op,device", ENTRIES, ids=[f"{op}-{device}" for op, device in ENTRIES])
def test_each_entry_gives_the_real_kernels_storage_size(op: str, device: str) -> None:
    if not _available(device):
        pytest.skip(f"needs a {device} device")
    for shape in SHAPES:
        for dtype in DTYPES:
            for reduction in (MEAN, SUM):
                real = _loss(op, shape, dtype, device, reduction)
                where = (op, shape, dtype, reduction)
                assert real.dim() == 0, where
                real_nbytes = real.untyped_storage().nbytes()
                # what the entry says: the elementwise loss's bytes, which the real 0-d result holds
                said = real_storage_nbytes(op, (torch.empty(shape), torch.empty(shape)), real)
                assert said == real_nbytes == torch.Size(shape).numel() * real.element_size(), where
                assert _fake_loss(op, shape, dtype, device, reduction, sized=True) == real_nbytes, where
                # and the entry is still needed: the meta kernel alone allocates the 0-d result only
                assert _fake_loss(op, shape, dtype, device, reduction, sized=False) == real.element_size(), where
            # without a reduction the result is the elementwise loss itself: nothing to correct
            unreduced = _loss(op, shape, dtype, device, NONE)
            assert real_storage_nbytes(op, (unreduced, unreduced), unreduced) is None
            assert _fake_loss(op, shape, dtype, device, NONE, sized=True) == unreduced.untyped_storage().nbytes()


@pytest.mark.parametrize("op", ["l1_loss", "huber_loss", "kl_div", "binary_cross_entropy_with_logits"])
def test_a_loss_not_listed_keeps_only_its_result_for_real_as_for_fake(op: str) -> None:
    """The table lists what differs, not every reduced loss: these CPU kernels return the 0-d
    result on its own storage, as the meta kernel does, and get no correction."""
    assert op not in KEEPS_UNREDUCED_STORAGE
    for dtype in DTYPES:
        real = _loss(op, (3, 256), dtype, "cpu", MEAN)
        assert real.untyped_storage().nbytes() == real.element_size()
        assert real_storage_nbytes(op, (real, real), real) is None
        assert _fake_loss(op, (3, 256), dtype, "cpu", MEAN, sized=True) == real.element_size()
