"""Bad input on the command line and in configs: one line that names the flag or field and
what is allowed, exit status 2, no traceback, nothing lost. Each case here gave a traceback,
a silent misreading or a wrong exit status before."""

from __future__ import annotations

import csv
import json
import resource
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import toml_text

from bpmem.cli import main
from bpmem.cli.run_commands import _new_run_folder
from bpmem.spec import SpecError, parse_budget
from bpmem.strategies.registry import make_step
from bpmem.sweep.config import ConfigError, parse_config

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "results.csv"

def _toml(**changes: object) -> str:
    """A one-cell sweep (a 6-5-3 MLP, batch 2, train), with ``changes`` to its keys."""
    model = {"input_dim": 6, "hidden_dim": 5, "output_dim": 3, "depth": changes.pop("depth", 1)}
    return toml_text.dumps({"name": "tiny", "batch_sizes": [2], "modes": ["train"], "repeats": 1, "warmup": 0,
                            **changes, "model": model})


TINY = _toml()


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors: the same one line and status 2
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.err + captured.out


# -- budgets -----------------------------------------------------------------------------------

def test_an_infeasible_budget_gives_the_smallest_feasible_one(capsys) -> None:
    code, err = _run(["estimate", "--strategy", "checkpoint-budget", "--budget", "0.01"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("bpmem estimate: error: argument --budget: ")
    smallest = int(err.split("allowed: at least ")[1].split(" bytes")[0])
    fraction = err.split("a fraction >= ")[1].split(" ")[0]
    # both suggestions are feasible, and one byte less is not: the message is exact
    assert _run(["estimate", "--strategy", "checkpoint-budget", "--budget", str(smallest)], capsys)[0] == 0
    assert _run(["estimate", "--strategy", "checkpoint-budget", "--budget", fraction], capsys)[0] == 0
    assert _run(["estimate", "--strategy", "checkpoint-budget", "--budget", str(smallest - 1)], capsys)[0] == 2


@pytest.mark.parametrize("text,want", [("0.5", 0.5), ("1", 1.0), (1, 1.0), ("1000000", 1000000), (2, 2),
                                       ("64MiB", 64 * 2**20), ("1.5 GiB", 3 * 2**29), (0.25, 0.25)])
def test_budgets_are_a_fraction_or_bytes(text: object, want: float) -> None:
    got = parse_budget(text)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("bad", ["1.5", 1.5, "0", 0, -3, "1e6", "abc", True, "1 B", "0.0"])
def test_an_ambiguous_budget_is_refused(bad: object, capsys) -> None:
    with pytest.raises(SpecError, match="budget"):
        parse_budget(bad)
    if isinstance(bad, str):
        code, err = _run(["estimate", "--strategy", "checkpoint-budget", f"--budget={bad}"], capsys)
        assert code == 2 and "argument --budget" in err and "a fraction of the plain figure in (0, 1]" in err


def test_step_spec_refuses_a_float_above_one() -> None:
    with pytest.raises(SpecError, match="budget"):
        make_step(strategy="checkpoint-budget", budget=1.5)


def test_toml_budgets_follow_the_same_rule() -> None:
    ok = parse_config({"strategies": [{"name": "checkpoint-budget", "budget": ["64MiB", 0.5, 1]}]})
    assert [dict(p)["budget"] for _, p in ok.strategies] == [64 * 2**20, 0.5, 1.0]
    with pytest.raises(ConfigError, match=r"strategies.budget: 1.5 is not allowed"):
        parse_config({"strategies": [{"name": "checkpoint-budget", "budget": 1.5}]})


# -- out of memory in measure ------------------------------------------------------------------

@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_a_measure_that_cannot_allocate_is_out_of_memory_not_a_crash() -> None:
    """A real failed allocation: a 100000 x 100000 weight (40 GB) under a 6 GB address space."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 * 10**9, 6 * 10**9))

    done = subprocess.run([sys.executable, "-m", "bpmem", "measure", "--input-dim", "100000", "--hidden-dim",
                           "100000"], capture_output=True, text=True, preexec_fn=limit, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert "out of memory on cpu" in done.stderr and "allowed: a smaller --batch-size" in done.stderr


# -- report on bad files -----------------------------------------------------------------------

def _fixture_run(tmp_path: Path, change) -> Path:
    frame = pd.read_csv(FIXTURE, dtype=str, keep_default_na=False)
    frame = change(frame)
    folder = tmp_path / "run"
    folder.mkdir()
    frame.to_csv(folder / "results.csv", index=False)
    return folder


@pytest.mark.parametrize("change,names", [
    (lambda f: f.iloc[0:0], "has a header but no rows"),
    (lambda f: f.drop(columns=["strategy"]), "has no column 'strategy'"),
    (lambda f: f.assign(batch_size=["x"] * len(f)), "batch_size is 'x'"),
    (lambda f: f.assign(mode=["sideways"] * len(f)), "mode is 'sideways'"),
])
def test_report_on_a_bad_results_csv_is_exit_2(tmp_path: Path, capsys, change, names: str) -> None:
    folder = _fixture_run(tmp_path, change)
    code, err = _run(["report", str(folder)], capsys)
    assert code == 2 and names in err and "Traceback" not in err


# -- folders that cannot be written --------------------------------------------------------------

def test_run_report_and_graph_into_an_unwritable_place_are_exit_2(tmp_path: Path, capsys) -> None:
    """A file where a folder must go fails for every user, root included."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = tmp_path / "c.toml"
    config.write_text(TINY)
    code, err = _run(["run", "--config", str(config), "--out", str(blocker / "run"), "--quiet"], capsys)
    assert code == 2 and "cannot write" in err and "Traceback" not in err
    code, err = _run(["graph", "--out", str(blocker / "g.svg")], capsys)
    assert code == 2 and "cannot write" in err
    folder = _fixture_run(tmp_path, lambda f: f)
    (folder / "plots").write_text("a file where the plots folder goes")
    code, err = _run(["report", str(folder)], capsys)
    assert code == 2 and "cannot write" in err
    assert (folder / "results.csv").read_text() == (tmp_path / "run" / "results.csv").read_text()


# -- configs and flags -------------------------------------------------------------------------

def test_a_config_without_cells_is_exit_2(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text(_toml(modes=["inference"], strategies=["checkpoint-sqrt"]))
    code, err = _run(["run", "--config", str(config), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "strategies" in err and "no cell" in err
    assert not (tmp_path / "o").exists()


def test_a_repeated_axis_value_is_one_cell(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text(_toml(depth=[1, 1]))
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "o"), "--quiet", "--no-report"]) == 0
    with (tmp_path / "o" / "results.csv").open() as handle:
        ids = [row["cell_id"] for row in csv.DictReader(handle)]
    assert len(ids) == len(set(ids)) == 1


def test_resume_with_overwrite_is_refused(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text(TINY)
    code, err = _run(["run", "--config", str(config), "--out", str(tmp_path / "o"), "--resume", "--overwrite"],
                     capsys)
    assert code == 2 and "--overwrite" in err and "--resume" in err


# -- run folders ------------------------------------------------------------------------------------

def _timeline_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "timelines.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_overwrite_replaces_every_output_of_the_old_run(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(TINY)
    out = tmp_path / "o"
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet", "--no-report"]) == 0
    first = _timeline_rows(out)
    assert first  # the one cell is a timeline cell (train, deepest model, batch nearest 64)
    (out / "logs").mkdir()
    (out / "logs" / "old.log").write_text("old")
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet", "--no-report", "--overwrite"]) == 0
    assert len(_timeline_rows(out)) == len(first)
    assert not (out / "logs" / "old.log").exists()


def test_a_kill_between_timeline_and_row_does_not_duplicate_the_timeline(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(TINY)
    out = tmp_path / "o"
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet", "--no-report"]) == 0
    events = len(_timeline_rows(out))
    header = (out / "results.csv").read_text().splitlines()[0]
    (out / "results.csv").write_text(header + "\n")  # the timeline was written, the row was not
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet", "--no-report", "--resume"]) == 0
    assert len(_timeline_rows(out)) == events


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path: Path) -> None:
    default = tmp_path / "reports" / "tiny-20261129-120000"
    folders = [_new_run_folder(None, default, overwrite=False) for _ in range(3)]
    assert [f.name for f in folders] == ["tiny-20261129-120000", "tiny-20261129-120000-2", "tiny-20261129-120000-3"]


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_progress_counts_cells_not_rows_with_jobs_and_split_cells(tmp_path: Path, capsys) -> None:
    """model-parallel gives a row per stage; the counter must end at the number of cells."""
    config = tmp_path / "c.toml"
    config.write_text(_toml(depth=3, strategies=["none", {"name": "model-parallel", "world_size": 2}]))
    code = main(["run", "--config", str(config), "--out", str(tmp_path / "o"), "--no-report", "--jobs", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    counts = [line.split("] ")[1].split(" ")[0] for line in err.splitlines() if line.startswith("[")]
    assert counts[-1] == "2/2" and all(int(c.split("/")[0]) <= 2 for c in counts), counts
    rows = json.loads(json.dumps(list(csv.DictReader((tmp_path / "o" / "results.csv").open()))))
    assert len(rows) == 3


def test_an_unexpected_error_is_exit_3_never_1(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Exit 1 means "regression" to CI: a bug in bpmem must not look like one."""
    import bpmem.cli

    def broken(args: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(bpmem.cli, "cmd_check", broken)
    monkeypatch.delenv("BPMEM_DEBUG", raising=False)
    code = bpmem.cli.run(["check", "--baseline", str(FIXTURE), "--results", str(FIXTURE)])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1 and "internal error: KeyError" in err
