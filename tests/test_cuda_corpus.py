"""The committed CUDA corpus (``tests/fixtures/cuda_corpus``, recorded by
``benchmarks/record_corpus.py`` on a GPU), held on the CPU: every snapshot replays through the
allocator model to its recorded segments and peaks, and the CPU path's reserved prediction
made on that machine with CUDA hidden is within 2% of the most the process reserved (its
segment events walked from the start: ``max_memory_reserved`` itself is reset by the probes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpmem.cuda_allocator.replay import load_snapshot, replay

CORPUS = Path(__file__).resolve().parent / "fixtures" / "cuda_corpus"
SNAPSHOTS = sorted(CORPUS.glob("*.pickle"))


@pytest.mark.skipif(not SNAPSHOTS, reason="no corpus recorded yet: it needs a GPU (benchmarks/gpu_check.sh step 0)")
@pytest.mark.parametrize("snapshot", SNAPSHOTS, ids=[p.stem for p in SNAPSHOTS])
def test_a_recorded_cell_replays_from_an_empty_allocator_to_its_own_figures(snapshot: Path) -> None:
    result = replay(load_snapshot(snapshot))
    assert result.from_empty and result.differences == ()
    assert result.max_reserved_bytes == result.recorded["max_reserved_bytes"]
    assert abs(result.max_allocated_bytes - result.recorded["max_allocated_bytes"]) <= \
        0.001 * result.recorded["max_allocated_bytes"]


@pytest.mark.skipif(not SNAPSHOTS, reason="no corpus recorded yet: it needs a GPU (benchmarks/gpu_check.sh step 0)")
@pytest.mark.parametrize("snapshot", SNAPSHOTS, ids=[p.stem for p in SNAPSHOTS])
def test_the_cpu_paths_reserved_prediction_is_the_recorded_one(snapshot: Path) -> None:
    predicted = json.loads((CORPUS / "predictions.json").read_text())[snapshot.stem]
    measured = replay(load_snapshot(snapshot)).recorded["max_reserved_bytes"]
    assert abs(predicted["predicted_cuda_reserved_bytes"] - measured) <= 0.02 * measured
