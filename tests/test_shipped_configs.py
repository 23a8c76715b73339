"""Every sweep config that bpmem ships for the CPU runs end to end: ``bpmem run`` (which
draws the report), ``bpmem report`` and ``bpmem check --predicted``, each with exit 0.

quick.toml once measured 126 rows and then stopped with exit 3, because its compile-budget
cell at B=1 wrote a negative prediction that results.csv's reader refused: no test ran the
configs as they ship. Here each runs with its batch sizes shrunk, one timed repeat (no more
pairs), and depths and sequence lengths capped at the smallest, so that the slow tier can
afford all of them. Every strategy, mode, model and training-step axis stays as shipped."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from typing import Any

import pytest
import toml_text

from bpmem.cli import main

pytestmark = pytest.mark.slow  # whole sweeps, torchrun jobs for split.toml

CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "configs"
SMALLEST_BATCH = 8  # divisible by every micro-batch count and world size the configs ask for


def _cpu_configs() -> list[Path]:
    """Every shipped config whose devices are all the CPU (the GPU ones need a GPU)."""
    return sorted(path for path in CONFIGS.glob("*.toml")
                  if all(device == "cpu" for device in tomllib.loads(path.read_text()).get("devices", ["cpu"])))


def shrunk(config: dict[str, Any]) -> dict[str, Any]:
    """The same sweep at its smallest batch (at most ``SMALLEST_BATCH``), timed once, with no
    extra pairs to narrow an overhead's interval (times are not what this test checks)."""
    small = dict(config, batch_sizes=[min(min(config["batch_sizes"]), SMALLEST_BATCH)], repeats=1, warmup=0,
                 timing_cap_s=0)
    grids = config.get("model", {})
    small["model"] = [_capped(grid) for grid in grids] if isinstance(grids, list) else _capped(grids)
    return small


def _capped(grid: dict[str, Any]) -> dict[str, Any]:
    """The smallest depth (the MLP) and sequence length (a Hugging Face model) of an axis."""
    for key in ("depth", "seq_len"):
        if isinstance(grid.get(key), list):
            grid = dict(grid, **{key: sorted(grid[key])[:1]})
    return grid


def test_the_cpu_configs_are_the_ones_this_test_names() -> None:
    """A config added later is run below without anyone listing it; this says which run now."""
    assert [path.stem for path in _cpu_configs()] == ["checkpoint", "ci", "gpu_dry_run", "hf", "models", "quick",
                                                     "split", "steps"]


def test_shrinking_keeps_every_strategy_mode_and_model() -> None:
    for path in _cpu_configs():
        shipped = tomllib.loads(path.read_text())
        small = tomllib.loads(toml_text.dumps(shrunk(shipped)))
        for key in ("strategies", "modes", "devices"):
            assert small.get(key) == shipped.get(key), (path.name, key)
        models = shipped.get("model", {})
        assert len(small["model"] if isinstance(models, list) else [small["model"]]) == (
            len(models) if isinstance(models, list) else 1)


def _runnable(path: Path) -> Any:
    """hf.toml needs transformers (the hf extra, in dev): skipped, and said so, without it."""
    needs_hf = "hf" in str(tomllib.loads(path.read_text()).get("model", {}))
    missing = needs_hf and importlib.util.find_spec("transformers") is None
    return pytest.param(path, id=path.stem, marks=pytest.mark.skipif(missing, reason="needs transformers"))


def _jobs(path: Path) -> list[str]:
    """Two jobs, which share the cores, as a user with a CPU sweep to get through would run
    it; split.toml's torchrun cells start two ranks each, so it runs in one job."""
    return [] if path.stem == "split" else ["--jobs", "2"]


@pytest.mark.parametrize("path", [_runnable(path) for path in _cpu_configs()])
def test_a_shipped_config_runs_reports_and_matches_its_predictions(path: Path, tmp_path: Path) -> None:
    config = tmp_path / path.name
    config.write_text(toml_text.dumps(shrunk(tomllib.loads(path.read_text()))))
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet", *_jobs(path)]) == 0
    assert (out / "report.md").is_file() and list((out / "plots").iterdir())
    assert main(["report", str(out)]) == 0
    assert main(["check", "--predicted", str(out)]) == 0
