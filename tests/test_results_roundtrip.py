"""results.csv reads back what pandas and spreadsheets write (``True``, ``TRUE``, ``269316.0``,
``NaN``) as the values bpmem wrote, and still refuses everything else, naming the file, the
line and the column. The writer checks each value as its reader would before it writes the
row, so a sweep never leaves a file its own reader refuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from test_sweep import TINY

import bpmem.sweep.run
from bpmem.cli import main, run
from bpmem.results.table import ResultsFileError, ResultsWriteError, ResultsWriter, load_rows, read_results

REPO_ROOT = Path(__file__).resolve().parent.parent

# the same two rows as bpmem writes them, and as pandas or a spreadsheet rewrites them
HEADER = "cell_id,status,bias,time_noisy,rank,saved_activation_bytes,peak_bytes,step_time_median_s,error\n"
BPMEM_TEXT = HEADER + "a,ok,true,false,0,269316,300000,0.5,\nb,oom,false,,0,,,,out of memory\n"
PANDAS_TEXT = HEADER + "a,ok,True,False,0.0,269316.0,3e5,0.5,\nb,oom,FALSE,NaN,0,nan,NaN,NaN,out of memory\n"


def _file(tmp_path: Path, text: str, name: str = "results.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the reader, on hand-written files ------------------------------------------------------

def test_pandas_and_spreadsheet_spellings_read_as_bpmem_wrote_them(tmp_path: Path) -> None:
    ours, theirs = _file(tmp_path, BPMEM_TEXT, "ours.csv"), _file(tmp_path, PANDAS_TEXT, "theirs.csv")
    rows = load_rows(theirs)
    assert rows == load_rows(ours)
    assert rows[0]["bias"] == "true" and rows[0]["saved_activation_bytes"] == "269316" and rows[0]["rank"] == "0"
    assert rows[0]["peak_bytes"] == "300000" and rows[1]["time_noisy"] == "" and rows[1]["peak_bytes"] == ""
    frame = read_results(theirs)
    pd.testing.assert_frame_equal(frame, read_results(ours))
    assert str(frame.saved_activation_bytes.dtype) == "Int64" and frame.saved_activation_bytes[0] == 269316
    assert frame.bias.tolist() == [True, False]


@pytest.mark.parametrize("column,bad,allowed", [
    ("saved_activation_bytes", "1.5", "an integer >= 0 or empty"),
    ("saved_activation_bytes", "12x", "an integer >= 0 or empty"),
    ("saved_activation_bytes", "-406528", "an integer >= 0 or empty"),
    ("saved_activation_bytes", "-406528.0", "an integer >= 0 or empty"),
    ("saved_activation_bytes", "inf", "an integer >= 0 or empty"),
    ("saved_activation_bytes", "1e400", "an integer >= 0 or empty"),
    ("peak_bytes", "1e17", "an integer >= 0 or empty"),  # past 2**53: not a count a float holds exactly
    ("rank", "0.5", "an integer >= 0 or empty"),
    ("bias", "maybe", "true, false"),
    ("time_noisy", "1", "true, false"),
])
def test_anything_else_is_still_refused_naming_file_line_and_column(tmp_path: Path, column: str, bad: str,
                                                                   allowed: str) -> None:
    """Line 2 in pandas' spelling reads; line 3's bad value is the first problem named."""
    lines = PANDAS_TEXT.splitlines(keepends=True)
    names = HEADER.strip().split(",")
    third = ["c", "ok", "TRUE", "false", "0", "1", "2", "0.1", ""]
    third[names.index(column)] = bad
    path = _file(tmp_path, "".join(lines[:2]) + ",".join(third) + "\n")
    with pytest.raises(ResultsFileError) as caught:
        load_rows(path)
    message = str(caught.value)
    assert message.startswith(f"{path}, line 3: {column} is {bad!r}; allowed: {allowed}"), message


def test_check_compares_a_pandas_rewrite_and_refuses_garbage_with_exit_2(tmp_path: Path, capsys) -> None:
    ours, theirs = _file(tmp_path, BPMEM_TEXT, "ours.csv"), _file(tmp_path, PANDAS_TEXT, "theirs.csv")
    assert main(["check", "--baseline", str(ours), "--results", str(theirs)]) == 0
    assert "0 regression(s)" in capsys.readouterr().out
    bad = _file(tmp_path, PANDAS_TEXT + "c,ok,True,False,0,1.5,2,0.1,\n", "bad.csv")
    assert main(["check", "--baseline", str(ours), "--results", str(bad)]) == 2
    assert f"{bad}, line 4: saved_activation_bytes is '1.5'; allowed: an integer" in capsys.readouterr().err


# -- the writer ---------------------------------------------------------------------------

def test_the_writer_refuses_a_negative_count_before_writing_it(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    header = ("cell_id", "status", "predicted_recompute_flops", "peak_bytes")
    with ResultsWriter(path, header) as writer:
        writer.write({"cell_id": "a", "status": "ok", "predicted_recompute_flops": 0, "peak_bytes": 100})
        before = path.read_text()
        with pytest.raises(ResultsWriteError) as caught:
            writer.write({"cell_id": "b", "status": "ok", "predicted_recompute_flops": -406528, "peak_bytes": 100})
        assert "cell 'b'" in str(caught.value) and "predicted_recompute_flops is '-406528'" in str(caught.value)
        assert path.read_text() == before  # nothing of the bad row, the good one intact
        writer.write({"cell_id": "c", "status": "ok", "predicted_recompute_flops": 7.0, "peak_bytes": 100})
    assert [(row["cell_id"], row["predicted_recompute_flops"]) for row in load_rows(path)] == [("a", "0"), ("c", "7")]


# test_sweep's tiny config, one strategy, one mode and one depth: three cells, one series each
SMALL = (TINY.replace('modes = ["train", "inference"]', 'modes = ["train"]\nstrategies = ["none"]')
         .replace("depth = [1, 2]", "depth = 1"))
assert SMALL.count('strategies = ["none"]') == 1 and "depth = 1\n" in SMALL


@pytest.mark.slow  # a (small) sweep
def test_a_sweep_that_makes_a_bad_value_stops_there_with_exit_3(tmp_path: Path, monkeypatch, capsys) -> None:
    """The bug that once wrote predicted_recompute_flops = -406528, brought back: the sweep
    stops at that cell (exit 3, a bpmem bug) and the rows before it still read."""
    real, made = bpmem.sweep.run.run_series, []

    def corrupting(*args, **kwargs) -> Iterator[list[dict]]:
        for rows in real(*args, **kwargs):
            made.append(rows)
            yield [{**row, "predicted_recompute_flops": -406528} for row in rows] if len(made) == 2 else rows

    monkeypatch.setattr(bpmem.sweep.run, "run_series", corrupting)
    config, out = _file(tmp_path, SMALL, "small.toml"), tmp_path / "run"
    assert run(["run", "--config", str(config), "--out", str(out), "--quiet", "--no-report"]) == 3
    assert "predicted_recompute_flops is '-406528'" in capsys.readouterr().err
    rows = load_rows(out / "results.csv")
    assert len(rows) == 1 and rows[0]["status"] == "ok" and len(made) == 2  # stopped at the bad cell


# -- a real sweep's results.csv through pandas --------------------------------------------

@pytest.fixture(scope="module")
def ci_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ci") / "run"
    assert main(["run", "--config", str(REPO_ROOT / "benchmarks/configs/ci.toml"), "--out", str(out), "--quiet",
                 "--no-report"]) == 0
    return out / "results.csv"


def _through_pandas(original: Path, path: Path, change=None) -> Path:
    frame = pd.read_csv(original)
    if change is not None:
        change(frame)
    frame.to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_a_pandas_round_trip_reads_as_the_original(ci_results: Path, tmp_path: Path, capsys) -> None:
    copy = _through_pandas(ci_results, tmp_path / "results.csv")
    assert "True" in copy.read_text() and ".0," in copy.read_text()  # pandas' spellings are in it
    assert main(["check", "--baseline", str(ci_results), "--results", str(copy), "--strict"]) == 0
    assert load_rows(copy) == load_rows(ci_results)  # what check and check --predicted see
    pd.testing.assert_frame_equal(read_results(copy), read_results(ci_results))  # what report sees
    capsys.readouterr()
    assert main(["check", "--predicted", str(copy)]) == main(["check", "--predicted", str(ci_results)])


@pytest.mark.slow
def test_one_byte_more_after_a_pandas_round_trip_is_a_regression(ci_results: Path, tmp_path: Path,
                                                                  capsys) -> None:
    def grow(frame: pd.DataFrame) -> None:
        row = frame.index[frame.status == "ok"][2]
        frame.loc[row, "peak_bytes"] += 1

    copy = _through_pandas(ci_results, tmp_path / "results.csv", grow)
    assert main(["check", "--baseline", str(ci_results), "--results", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "+1" in out and "1 regression(s)" in out


@pytest.mark.slow
def test_garbage_after_a_pandas_round_trip_is_exit_2_naming_file_line_column(ci_results: Path, tmp_path: Path,
                                                                             capsys) -> None:
    def spoil(frame: pd.DataFrame) -> None:
        frame["saved_activation_bytes"] = frame["saved_activation_bytes"].astype(object)
        frame.loc[3, "saved_activation_bytes"] = "12x"

    copy = _through_pandas(ci_results, tmp_path / "results.csv", spoil)
    assert main(["check", "--baseline", str(ci_results), "--results", str(copy)]) == 2
    assert f"{copy}, line 5: saved_activation_bytes is '12x'; allowed: an integer" in capsys.readouterr().err
