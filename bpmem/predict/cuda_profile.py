"""What a CUDA step allocates that a dry run on the CPU's kernels does not, per torch version.

A dry run without a GPU runs fake tensors through the CPU's kernels, so its allocations are
the CPU's. Where CUDA's differ, the difference is named here, once, for the torch and CUDA
versions it was measured on, with what the CPU path does about it:

- ``modelled``: the prediction puts it right (the figure or rule is in this profile);
- ``the same``: measured equal on the GPU's rows, nothing to put right;
- ``a named gap``: not modelled; the measured size of the miss is given, and the estimate
  lists it.

The measurements are the H200 rows in ``reports/gpu-example`` (68 train rows, torch
2.11.0+cu130, CUDA 13.0, one process per sweep), held against predictions made on a CPU-only
machine by ``tests/test_cuda_reserved.py``. A torch version with no profile of its own takes
the nearest measured one, and the CUDA view says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

Handling = Literal["modelled", "the same", "a named gap"]


@dataclass(frozen=True)
class CudaDifference:
    """One way a CUDA step's allocations differ from the CPU's kernels'."""

    name: str
    cuda_does: str
    handling: Handling
    measured: str  # on the profile's GPU rows: how large the difference is, or that there is none


@dataclass(frozen=True)
class CudaProfile:
    """The differences measured for one torch and CUDA version, and the constants they give."""

    torch: str  # major.minor
    cuda: str
    gpu: str
    cublas_workspace_bytes: int  # one block, allocated at the first matmul, live to the end
    context_bytes: int  # outside the allocator: the CUDA context, kernel images, library handles
    differences: tuple[CudaDifference, ...]

    def line(self) -> str:
        return f"torch {self.torch}, CUDA {self.cuda}, measured on an {self.gpu}"


# cuDNN picks a convolution algorithm, and its workspace, per shape at run time; PyTorch caps each
# workspace at CUDNN_CONV_WSCAP_DBG MiB where that variable is set, else only by the free memory
CUDNN_CAP_VARIABLE = "CUDNN_CONV_WSCAP_DBG"

TORCH_2_11_CUDA_13 = CudaProfile(
    torch="2.11", cuda="13.0", gpu="NVIDIA H200",
    # cuda_workspace_bytes, the baseline before the step: 67,108,864 B on every H200 MLP row
    cublas_workspace_bytes=64 << 20,
    # an H200 out-of-memory message: "this process has 138.85 GiB memory in use", less 137.12 GiB
    # allocated and 1.00 GiB reserved but unallocated (each rounded to 0.01 GiB)
    context_bytes=748 << 20,
    differences=(
        CudaDifference("cuBLAS workspace", "allocates 64 MiB through the caching allocator at the first matmul "
                       "and keeps it", "modelled",
                       "67,108,864 B: the baseline of every MLP row, the least of any row; the stream's first block"),
        CudaDifference("Adam's step counters", "keeps state['step'] in host memory unless the optimizer is fused",
                       "modelled", "the seed MLP's Adam rows exact to the byte once they are left out"),
        CudaDifference("512 B blocks", "rounds every allocation up to 512 B (small pool below 1 MiB)",
                       "modelled", "by the allocator model (bpmem.cuda_allocator)"),
        CudaDifference("SDPA's backend and saved tensors", "runs flash attention, saving its log-sum-exp "
                       "(float32, B x H x T) as the CPU's flash kernel does; the RNG seed and offset are host "
                       "tensors without dropout", "the same",
                       "the GPT's plain rows exact at B=4 and B=64; its recomputing rows at B=64 264,704 B "
                       "(0.30% to 0.51%) low"),
        CudaDifference("autocast's cast policy", "casts by CUDA's op lists, which differ from the CPU's",
                       "a named gap", "bfloat16 rows 512 B to 20,480 B low (at most 0.081%)"),
        CudaDifference("hvp's double backward", "has double-backward kernels where the CPU's flash attention has "
                       "none", "a named gap", "no GPU hvp row was measured; the CPU path refuses attention models"),
        CudaDifference("the GPT's microbatch kernels", "picks other matmul and attention kernels for the "
                       "microbatch's small slices", "a named gap",
                       "137,216 B (1.57%) low at B=4, 387,584 B (1.36%) at B=64"),
        CudaDifference("cuDNN's convolution workspaces", "allocates a workspace per convolution, of a size "
                       "its algorithm choice gives, freed after the kernel", "a named gap",
                       "the ResNet's rows 101,888 B to 69,201,408 B (4.5% to 69%) low; "
                       f"bounded by {CUDNN_CAP_VARIABLE} MiB per convolution where that is set"),
        CudaDifference("NCCL", "keeps its own buffers outside the allocator", "a named gap",
                       "not measured: the H200 runs had one GPU"),
    ),
)

PROFILES: dict[str, CudaProfile] = {TORCH_2_11_CUDA_13.torch: TORCH_2_11_CUDA_13}


def profile_for(torch_version: str) -> tuple[CudaProfile, bool]:
    """The profile for ``torch_version`` ("2.11.0+cpu"), and whether it was measured on that
    version; else the nearest measured version's."""
    major_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    if major_minor in PROFILES:
        return PROFILES[major_minor], True

    def distance(version: str) -> tuple[int, int]:
        (a, b), (c, d) = (map(int, version.split(".")), map(int, major_minor.split(".")))
        return abs(a - c), abs(b - d)

    return PROFILES[min(PROFILES, key=distance)], False


def current_profile() -> tuple[CudaProfile, bool]:
    """``profile_for`` the torch installed here."""
    import torch

    return profile_for(torch.__version__)


def cudnn_workspace_cap_bytes() -> int | None:
    """Each convolution's workspace bound from ``CUDNN_CONV_WSCAP_DBG`` (MiB), where set."""
    value = os.environ.get(CUDNN_CAP_VARIABLE, "").strip()
    return int(value) << 20 if value.isdigit() else None


def gaps(profile: CudaProfile) -> list[str]:
    """The named gaps, one line each, for ``cannot_see``."""
    return [f"{d.name}: {d.measured}" for d in profile.differences if d.handling == "a named gap"]


def view_line(on_cuda: bool) -> str:
    """The one line that says where a CUDA prediction comes from."""
    if on_cuda:
        return "predicted on this machine's CUDA (its own kernels; the caching allocator modelled)"
    import torch

    profile, measured_here = current_profile()
    nearest = "" if measured_here else f", the nearest measured to torch {torch.__version__} here"
    return (f"predicted for CUDA without a GPU here (profile: torch {profile.torch}, CUDA {profile.cuda}{nearest}; "
            "the CPU's kernels, CUDA's allocator modelled)")
