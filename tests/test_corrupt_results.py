"""Property test: ``bpmem check`` and ``bpmem report`` on results.csv files corrupted in many
ways (a dropped column, garbage cells, floats, unterminated quotes, a header only, an empty
file, duplicate cells, a file cut short, stray bytes). Every exit is 0, 1 or 2, and nothing
escapes as a traceback: a corrupt file is bad input (2), never a crash or a regression."""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpmem.cli import main
from bpmem.results.table import load_rows

pytestmark = pytest.mark.slow  # a property search: many files, many reports

FIXTURE = Path(__file__).parent / "fixtures" / "results.csv"
# more examples for a deeper search: BPMEM_HYPOTHESIS_EXAMPLES=500 pytest tests/test_corrupt_results.py
EXAMPLES = int(os.environ.get("BPMEM_HYPOTHESIS_EXAMPLES", "60"))
LINES = list(csv.reader(io.StringIO(FIXTURE.read_text())))


def _text(lines: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    return buffer.getvalue()


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    lines = [list(line) for line in LINES]
    kind = draw(st.sampled_from(["drop_column", "garbage", "column", "float", "quote", "header_only", "empty",
                                 "duplicate", "cut", "bytes", "several"]))
    kinds = draw(st.lists(st.sampled_from(["drop_column", "garbage", "column", "float", "duplicate"]), min_size=2,
                          max_size=4)) if kind == "several" else [kind]
    for kind in kinds:
        if kind == "drop_column":
            column = draw(st.integers(0, len(lines[0]) - 1))
            lines = [line[:column] + line[column + 1:] for line in lines]
        elif kind == "garbage":
            row, column = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines[0]) - 1))
            lines[row][column] = draw(st.text(max_size=12))
        elif kind == "column":  # one column the same odd value in every row
            column = draw(st.integers(0, len(lines[0]) - 1))
            value = draw(st.sampled_from(["", "{", "[1]", "nan", "inf", "-1", "0", "1.5", "x", "true", '"']))
            for line in lines[1:]:
                line[column] = value
        elif kind == "float":
            row, column = draw(st.integers(1, len(lines) - 1)), draw(st.integers(0, len(lines[0]) - 1))
            lines[row][column] = str(draw(st.floats(allow_nan=True, allow_infinity=True)))
        elif kind == "header_only":
            lines = lines[:1]
        elif kind == "empty":
            return b""
        elif kind == "duplicate":
            lines.append(list(lines[draw(st.integers(1, len(lines) - 1))]))
    data = _text(lines).encode()
    if "quote" in kinds:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b'"' + data[at:]
    if "cut" in kinds:
        data = data[:draw(st.integers(0, len(data)))]
    if "bytes" in kinds:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    return data


def _exit_code(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _check_both_ways(other: Path, data: bytes, rules: list[str], capsys: pytest.CaptureFixture[str]
                     ) -> list[tuple[int, str]]:
    """``data`` written to ``other``; then ``bpmem check`` of it against the fixture, and of the
    fixture against it."""
    other.write_bytes(data)
    return [_exit_code(["check", "--baseline", str(baseline), "--results", str(results), *rules], capsys)
            for baseline, results in ((FIXTURE, other), (other, FIXTURE))]


# every example gets a fresh file under the one tmp_path, so the function-scoped fixture is safe
EXAMPLE_SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                            suppress_health_check=[HealthCheck.function_scoped_fixture])


@EXAMPLE_SETTINGS
@given(data=corrupted())
def test_check_on_a_corrupt_file_exits_0_1_or_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                data: bytes) -> None:
    for code, out in _check_both_ways(tmp_path / "bad.csv", data, ["--fail", "saved:0%", "--fail", "peak:1%"], capsys):
        assert code in (0, 1, 2), out
        assert "Traceback" not in out


@settings(max_examples=max(1, EXAMPLES // 2), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=corrupted())
def test_report_on_a_corrupt_file_exits_0_or_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              data: bytes) -> None:
    folder = tmp_path / "run"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "results.csv").write_bytes(data)
    code, out = _exit_code(["report", str(folder)], capsys)
    assert code in (0, 2), out
    assert "Traceback" not in out


# -- the same file in pandas' and spreadsheets' spellings is the same file ------------------

INTEGER_LIKE = ("_bytes", "_flops", "world_size", "rank", "repeats", "warmup", "batch_size", "depth", "_dim")


@st.composite
def respelled(draw: st.DrawFn) -> bytes:
    """The fixture as pandas or a spreadsheet rewrites it, column by column: booleans as
    True or TRUE, integers as 813056.0 or 8.130560000000000e+05, missing values as NaN."""
    lines = [list(line) for line in LINES]
    rows = draw(st.sets(st.integers(1, len(lines) - 1), min_size=1))
    for index, column in enumerate(lines[0]):
        spelling = draw(st.sampled_from(["as is", "title", "upper", "point", "exponent", "nan"]))
        for number in rows:
            value = lines[number][index]
            if value in ("true", "false") and spelling in ("title", "upper"):
                lines[number][index] = value.title() if spelling == "title" else value.upper()
            elif value.isdigit() and column.endswith(INTEGER_LIKE) and spelling in ("point", "exponent"):
                lines[number][index] = f"{value}.0" if spelling == "point" else f"{int(value):.15e}"
            elif value == "" and spelling == "nan":
                lines[number][index] = draw(st.sampled_from(["NaN", "nan"]))
    return _text(lines).encode()


@EXAMPLE_SETTINGS
@given(data=respelled())
def test_check_reads_a_respelled_file_as_the_original(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      data: bytes) -> None:
    rules = ["--strict", "--fail", "saved:0%", "--fail", "peak:0%"]
    checks = _check_both_ways(respelt := tmp_path / "respelt.csv", data, rules, capsys)
    assert load_rows(respelt) == load_rows(FIXTURE)
    for code, out in checks:
        assert code == 0 and "0 regression(s)" in out, out
