"""``bpmem run --shard K/N``: every cell in exactly one shard, and the shards merged by
``bpmem report`` and ``bpmem check`` give the unsharded run's cells, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import toml_text

from bpmem.cli import main
from bpmem.results.merge import Shard
from bpmem.sweep.config import parse_config

CONFIG = {"name": "grid", "batch_sizes": [1, 4], "modes": ["train", "inference"], "repeats": 1, "warmup": 0,
          "strategies": ["none", "checkpoint-sqrt"],
          "model": {"input_dim": 6, "hidden_dim": 5, "output_dim": 3, "depth": [1, 2, 3]}}
BYTES = ["params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes", "peak_bytes",
         "inference_peak_bytes", "predicted_saved_activation_bytes", "predicted_peak_bytes"]


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_every_cell_is_in_exactly_one_shard_and_series_stay_whole(count: int) -> None:
    cells = parse_config(CONFIG).cells()
    shards = [Shard(k, count).cells(cells) for k in range(1, count + 1)]
    assert sorted(c.cell_id for part in shards for c in part) == sorted(c.cell_id for c in cells)
    for part in shards:
        for cell in part:  # the whole series of each of its cells is in the same shard
            assert {c.cell_id for c in cells if c.series == cell.series} <= {c.cell_id for c in part}


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "a/b", "2", "1/3/4"])
def test_a_bad_shard_names_the_flag(text: str, tmp_path: Path, capsys) -> None:
    config = tmp_path / "grid.toml"
    config.write_text(toml_text.dumps(CONFIG))
    with pytest.raises(SystemExit) as stop:
        main(["run", "--config", str(config), "--shard", text])
    assert stop.value.code == 2 and "argument --shard" in capsys.readouterr().err


@pytest.mark.slow  # a whole sweep
def test_three_shards_merged_equal_the_unsharded_run(tmp_path: Path, capsys) -> None:
    config = tmp_path / "grid.toml"
    config.write_text(toml_text.dumps(CONFIG))
    whole = tmp_path / "whole"
    assert main(["run", "--config", str(config), "--out", str(whole), "--quiet", "--no-report"]) == 0
    shards = [tmp_path / f"shard{k}" for k in (1, 2, 3)]
    for k, folder in enumerate(shards, start=1):
        assert main(["run", "--config", str(config), "--out", str(folder), "--shard", f"{k}/3", "--quiet",
                     "--no-report"]) == 0
    merged = tmp_path / "merged"
    assert main(["report", *map(str, shards), "--out", str(merged)]) == 0
    assert (merged / "report.md").exists()
    want = pd.read_csv(whole / "results.csv").set_index("cell_id").sort_index()
    got = pd.read_csv(merged / "results.csv").set_index("cell_id").sort_index()
    assert list(got.index) == list(want.index)
    pd.testing.assert_frame_equal(got[BYTES + ["status"]], want[BYTES + ["status"]])
    capsys.readouterr()
    results = [arg for folder in shards for arg in ("--results", str(folder))]
    assert main(["check", "--baseline", str(whole), *results, "--fail", "saved:0%", "--fail", "peak:0%",
                 "--strict"]) == 0
    assert f"{len(want)} cells compared, 0 regression(s)" in capsys.readouterr().out


def _shard_run(tmp_path: Path, name: str, shard: str) -> tuple[Path, Path]:
    """(config, run folder) of one shard of CONFIG, run quietly."""
    config = tmp_path / "grid.toml"
    config.write_text(toml_text.dumps(CONFIG))
    out = tmp_path / name
    assert main(["run", "--config", str(config), "--out", str(out), "--shard", shard, "--quiet", "--no-report"]) == 0
    return config, out


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_a_cell_in_two_folders_is_an_error_not_a_duplicate(tmp_path: Path, capsys) -> None:
    _, one = _shard_run(tmp_path, "one", "1/2")
    capsys.readouterr()
    assert main(["report", str(one), str(one), "--out", str(tmp_path / "m")]) == 2
    assert "is in both" in capsys.readouterr().err
    assert main(["check", "--baseline", str(one), "--results", str(one), "--results", str(one)]) == 2
    assert "is in both" in capsys.readouterr().err
    assert main(["report", str(one), str(one)]) == 2  # several folders need --out
    assert "argument --out" in capsys.readouterr().err


def test_resume_keeps_to_its_shard(tmp_path: Path, capsys) -> None:
    config, out = _shard_run(tmp_path, "s", "2/3")
    capsys.readouterr()
    assert main(["run", "--config", str(config), "--out", str(out), "--resume", "--shard", "1/3"]) == 2
    assert "argument --shard" in capsys.readouterr().err
    assert main(["run", "--config", str(config), "--out", str(out), "--resume", "--shard", "2/3", "--quiet",
                 "--no-report"]) == 0
