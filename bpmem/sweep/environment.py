"""Where a number was made: versions, device and commit, attached to every result."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from bpmem import __version__


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The bpmem checkout's commit (with ``+dirty`` if modified), or "" outside git."""
    root = Path(__file__).resolve().parents[2]  # bpmem/sweep/environment.py -> checkout
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _torch_versions() -> tuple[str, str]:
    """(torch, CUDA build) versions; read from package metadata when torch is not loaded,
    so that ``bpmem estimate`` stays free of torch's import time."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.__version__, torch.version.cuda or ""
    try:
        return importlib.metadata.version("torch"), ""
    except importlib.metadata.PackageNotFoundError:
        return "", ""


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and hardware for one device; the keys match results.csv's columns."""
    torch_version, cuda_version = _torch_versions()
    return {
        "bpmem_version": __version__,
        "torch_version": torch_version,
        "python_version": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "cuda_version": cuda_version,
        "git_commit": git_commit(),
        "hostname": platform.node(),
    }
