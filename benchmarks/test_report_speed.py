"""How long ``bpmem report`` takes on a 500-row results.csv (the target: under 20 s).

The rows are the test fixture's 20 cells, repeated with distinct cell ids and batch sizes,
so every plot has many series to draw. Nothing is asserted on time here.

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/test_report_speed.py --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from bpmem.report.build import report

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def test_report_500_rows(benchmark, tmp_path: Path) -> None:
    base = pd.read_csv(FIXTURES / "results.csv", dtype=str, keep_default_na=False)
    copies = []
    for k in range(25):
        part = base.copy()
        part["cell_id"] = part["cell_id"] + f"-copy{k}"
        part["batch_size"] = (part["batch_size"].astype(int) * (k + 1)).astype(str)
        copies.append(part)
    frame = pd.concat(copies)
    assert len(frame) == 500
    frame.to_csv(tmp_path / "results.csv", index=False)
    shutil.copy(FIXTURES / "timelines.csv", tmp_path / "timelines.csv")
    benchmark.pedantic(report, args=(tmp_path,), rounds=2, warmup_rounds=0)
    assert (tmp_path / "report.md").exists()
