"""Where a number was made: versions, device and commit, attached to every result."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import bpmem


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The bpmem checkout's commit (with ``+dirty`` if modified), or "" outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Versions and hardware for one device; the keys match results.csv's columns."""
    return {
        "bpmem_version": bpmem.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "cuda_version": torch.version.cuda or "",
        "git_commit": git_commit(),
        "hostname": platform.node(),
    }
