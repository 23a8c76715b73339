"""``predicted_cuda_reserved_bytes`` held against reserved memory measured on an H200
(``reports/gpu-example``, torch 2.11 with CUDA 13), predicted here without a GPU: the dry
run's allocations, in a fresh process's order, through the caching allocator model.

Only the rows read in a process whose allocator held nothing but the cuBLAS workspace are
compared: each sweep ran its cells in one process, and a segment that a later cell could not
give back (``empty_cache`` frees only wholly free segments) stays in every later row's
``max_memory_reserved``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bpmem.predict.cuda_reserved import predict_cuda_allocator
from bpmem.sweep.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# (run folder, config, cell): the first train cells of each recorded sweep, and one that needed
# more than everything cached before it
STEPS = "d784-h256-q10-L4-nobias-relu-cross_entropy-float32-l2=0.001-adam-wd=0.01-foreach"
CLEAN_ROWS = [
    ("gpu-seed", "gpu_seed", "d784-h256-q10-L1-nobias-relu-cross_entropy-float32-l2=0.001-sgd-B64-train-none-cuda:0"),
    ("gpu-steps", "gpu_steps", f"{STEPS}-B64-train-none-cuda:0"),
    ("gpu-steps", "gpu_steps", f"{STEPS}-B4096-train-none-cuda:0"),
    ("gpu-models", "models", "bpmem.models.gpt:make_gpt-layers=2-cross_entropy-adam-B4-train-none-cuda:0"),
]


def _row_and_cell(folder: str, config: str, cell_id: str):  # noqa: ANN202 - a results row and its Cell
    frame = pd.read_csv(ROOT / "reports" / "gpu-example" / folder / "results.csv")
    [row] = [r for _, r in frame.iterrows() if r.cell_id == cell_id]
    cells = {c.cell_id: c for c in load_config(ROOT / "benchmarks" / "configs" / f"{config}.toml").cells()}
    # the configs name the device "cuda" (models.toml: "cpu"; the GPU script rewrote it to cuda:0)
    found = next((cells[k] for k in (cell_id, cell_id.replace("-cuda:0", "-cuda"), cell_id.replace("-cuda:0", "-cpu"))
                  if k in cells), None)
    assert found is not None, cell_id
    return row, found


@pytest.mark.slow  # a dry run per row
@pytest.mark.parametrize("folder,config,cell", CLEAN_ROWS, ids=["seed-B64", "steps-B64", "steps-B4096", "gpt-B4"])
def test_the_reserved_peak_is_predicted_to_the_byte_without_a_gpu(folder: str, config: str, cell: str) -> None:
    row, found = _row_and_cell(folder, config, cell)
    predicted = predict_cuda_allocator(found.spec, found.step, "cuda")
    assert predicted.reserved_bytes == int(row.cuda_max_reserved_bytes)
    # allocated, workspace included: the MLP's to the byte (Adam's step counters, which CUDA keeps
    # on the host, left out), the GPT's to 1.5% (CUDA's attention saves other tensors than the CPU's)
    if "gpt" in found.cell_id:
        assert abs(predicted.allocated_bytes - row.cuda_max_allocated_bytes) <= 0.015 * row.cuda_max_allocated_bytes
    else:
        assert predicted.allocated_bytes == int(row.cuda_max_allocated_bytes)


@pytest.mark.slow  # one dry run per H200 row: about half a minute
def test_every_h200_rows_step_allocation_is_predicted_without_a_gpu() -> None:
    """``predicted_cuda_allocated_bytes`` (the last step's most allocated, in the model's blocks,
    less the workspace) against each committed train row's ``cuda_step_allocated_bytes``: within
    1% on at least 95% of the rows without convolutions, to the byte on the seed MLP's. The
    ResNet's rows are lower by up to 69%: cuDNN's workspaces are allocator blocks that no op
    returns, which no dry run sees (named in cannot_see)."""
    errors: dict[str, list[float]] = {"mlp": [], "gpt": [], "resnet": []}
    misses: dict[tuple[str, str], int] = {}
    for folder, config in (("gpu-seed", "gpu_seed"), ("gpu-steps", "gpu_steps"), ("gpu-models", "models")):
        frame = pd.read_csv(ROOT / "reports" / "gpu-example" / folder / "results.csv")
        for _, row in frame[(frame["mode"] == "train") & frame.cuda_step_allocated_bytes.notna()].iterrows():
            _, found = _row_and_cell(folder, config, row.cell_id)
            predicted = predict_cuda_allocator(found.spec, found.step, "cuda").step_allocated_bytes
            kind = "resnet" if "resnet" in row.cell_id else "gpt" if "gpt" in row.cell_id else "mlp"
            errors[kind].append((predicted - row.cuda_step_allocated_bytes) / row.cuda_step_allocated_bytes)
            misses[kind, row.cell_id] = predicted - int(row.cuda_step_allocated_bytes)
    plain = errors["mlp"] + errors["gpt"]
    assert len(plain) == 56 and sum(abs(e) <= 0.01 for e in plain) >= 0.95 * len(plain)
    assert sum(e == 0 for e in errors["mlp"]) >= 39 and len(errors["resnet"]) == 12
    assert all(e < 0 for e in errors["resnet"])  # cuDNN's workspaces: always more on the device
    # the profile's named gaps, as bpmem.predict.cuda_profile states their sizes
    gap = {key: miss for key, miss in misses.items() if miss}
    assert all("amp=bfloat16" in cell for (kind, cell) in gap if kind == "mlp")  # autocast's cast policy
    assert min(m for (kind, _), m in gap.items() if kind == "mlp") == -20_480
    gpt = {cell: m for (kind, cell), m in gap.items() if kind == "gpt"}
    microbatch = {cell.split("-adam-")[1].split("-")[0]: m for cell, m in gpt.items() if "microbatch" in cell}
    assert microbatch == {"B4": -137_216, "B64": -387_584}  # the microbatch's kernels
    recomputing = {cell: m for cell, m in gpt.items() if "microbatch" not in cell}
    assert len(recomputing) == 4 and all("-B64-" in cell for cell in recomputing)  # SDPA's recompute at B=64
    assert set(recomputing.values()) == {-264_704}
    assert min(m for (kind, _), m in gap.items() if kind == "resnet") == -69_201_408


@pytest.mark.slow  # a dry run through the allocator model, several seconds
def test_estimate_gives_the_cuda_view_of_the_h200_row_without_a_gpu(capsys) -> None:
    """``bpmem estimate --device-kind cuda`` on the H200's first gpu-steps row: its reserved
    77,594,624 B and its step's 8,471,552 B, as that row measured them."""
    import json

    from bpmem.cli import main

    flags = ["--depth", "4", "--optimizer", "adam", "--optimizer-impl", "foreach", "--weight-decay", "0.01",
             "--batch-size", "64", "--device-kind", "cuda"]
    assert main(["estimate", *flags, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["predicted_cuda_reserved_bytes"], out["predicted_cuda_allocated_bytes"]) == (77_594_624, 8_471_552)
    assert out["cuda_view"].startswith(("predicted for CUDA without a GPU here (profile: torch 2.11, CUDA 13.0",
                                        "predicted on this machine"))
    assert any(line.startswith("cuDNN's convolution workspaces") for line in out["cuda_cannot_see"])
    assert main(["estimate", *flags, "--arithmetic"]) == 2
    assert "argument --device-kind" in capsys.readouterr().err
