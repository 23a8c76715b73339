"""The CUDA profile (``bpmem/predict/cuda_profile.py``): one named place per torch version for
what a CUDA step allocates that the CPU's kernels do not. The sizes it states are held against
the H200 rows in tests/test_cuda_reserved.py; here, its constants against those rows' columns,
and how a version without a profile of its own is told."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bpmem.predict.cuda_profile import TORCH_2_11_CUDA_13, cudnn_workspace_cap_bytes, gaps, profile_for, view_line

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("gpu-seed", "gpu-steps", "gpu-models")


def test_the_profile_is_the_one_its_rows_were_measured_with() -> None:
    for run in RUNS:
        frame = pd.read_csv(ROOT / "reports" / "gpu-example" / run / "results.csv")
        measured = frame[frame.cuda_workspace_bytes.notna()]
        # the baseline before each step: the workspace alone on the MLP's rows; the models' runs hold
        # a little more, left by the cells before
        baseline = set(measured.cuda_workspace_bytes.astype(int))
        workspace = TORCH_2_11_CUDA_13.cublas_workspace_bytes
        assert baseline == {workspace} if run != "gpu-models" else min(baseline) > workspace
        assert set(frame.torch_version) == {"2.11.0+cu130"} and set(frame.cuda_version.astype(str)) == {"13.0"}
        assert set(frame.device_name) == {TORCH_2_11_CUDA_13.gpu}


@pytest.mark.parametrize("version,measured", [("2.11.0+cu130", True), ("2.11.1", True), ("2.13.0+cpu", False),
                                              ("2.6.0", False)])
def test_a_version_without_a_profile_takes_the_nearest_and_says_so(version: str, measured: bool) -> None:
    profile, exact = profile_for(version)
    assert profile is TORCH_2_11_CUDA_13 and exact is measured


def test_the_cuda_view_names_its_profile() -> None:
    import torch

    line = view_line(on_cuda=False)
    assert line.startswith("predicted for CUDA without a GPU here (profile: torch 2.11, CUDA 13.0")
    assert ("the nearest measured" in line) is (not torch.__version__.startswith("2.11."))
    assert view_line(on_cuda=True).startswith("predicted on this machine's CUDA")


def test_every_gap_is_named_with_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    named = gaps(TORCH_2_11_CUDA_13)
    assert [line.split(": ")[0] for line in named] == ["autocast's cast policy", "hvp's double backward",
                                                      "the GPT's microbatch kernels",
                                                      "cuDNN's convolution workspaces", "NCCL"]
    monkeypatch.delenv("CUDNN_CONV_WSCAP_DBG", raising=False)
    assert cudnn_workspace_cap_bytes() is None
    monkeypatch.setenv("CUDNN_CONV_WSCAP_DBG", "256")
    assert cudnn_workspace_cap_bytes() == 256 << 20
