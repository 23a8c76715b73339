"""``bpmem fit``: its answer is checked by measuring, for real, at the batch it reports and at
the next one: the first fits the budget and the second does not."""

from __future__ import annotations

import json

import pytest

from bpmem.cli import main
from bpmem.measurement.cell import measure
from bpmem.models.user_model import TensorShape, UserModel
from bpmem.predict.fit import largest_batch
from bpmem.spec import MLPSpec
from bpmem.strategies.registry import make_step

SHAPES = UserModel("tests.fixtures.user_models:small_mlp", inputs=(TensorShape.parse("float32[B,20]", "--input"),),
                   target=TensorShape.parse("int64[B]<5", "--target"))


def _fit(argv: list[str], capsys) -> dict:
    assert main(["fit", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_checkpointed_mlp_fits_at_the_batch_the_dry_run_reports_and_not_at_the_next() -> None:
    """checkpoint-sqrt's peak has no exact arithmetic: fit asks the dry run on fake tensors,
    and the measured step fits at the batch it reports and not at the next."""
    from bpmem.predict.fit import fit

    spec, memory = MLPSpec(depth=3), 12 * 2**20
    [answer] = fit(spec, make_step("checkpoint-sqrt", optimizer="adam"), memory, [])
    batch = answer.max_batch_size
    fits = measure(spec, make_step("checkpoint-sqrt", batch_size=batch, optimizer="adam")).peak_bytes
    overflows = measure(spec, make_step("checkpoint-sqrt", batch_size=batch + 1, optimizer="adam")).peak_bytes
    assert fits == answer.peak_bytes <= memory < overflows == answer.next_peak_bytes


@pytest.mark.slow  # every strategy, each a search of dry runs
# (a bare byte count such as "9876543" parses as test_units.py shows; one search is enough here)
def test_the_mlp_fits_at_the_batch_it_reports_and_not_at_the_next(capsys) -> None:
    answer = _fit(["--memory", "12MiB", "--depth", "3", "--optimizer", "adam"], capsys)
    batch, budget = answer["max_batch_size"], answer["memory_bytes"]
    spec = MLPSpec(depth=3)
    fits = measure(spec, make_step(batch_size=batch, optimizer="adam")).peak_bytes
    overflows = measure(spec, make_step(batch_size=batch + 1, optimizer="adam")).peak_bytes
    assert fits == answer["peak_bytes"] <= budget < overflows == answer["next_peak_bytes"]
    assert {s["strategy"] for s in answer["strategies"]} >= {"none", "checkpoint-sqrt", "microbatch"}


@pytest.mark.slow  # dozens of fake-tensor steps
def test_a_user_model_fits_at_the_batch_it_reports_and_not_at_the_next(capsys) -> None:
    answer = _fit(["--memory", "200KiB", "--model", SHAPES.factory, "--input", "float32[B,20]", "--target",
                   "int64[B]<5"], capsys)
    batch, budget = answer["max_batch_size"], answer["memory_bytes"]
    fits = measure(SHAPES, make_step(batch_size=batch)).peak_bytes
    overflows = measure(SHAPES, make_step(batch_size=batch + 1)).peak_bytes
    assert fits <= budget < overflows


@pytest.mark.slow  # dozens of fake-tensor steps
def test_cuda_blocks_count_more_than_cpu_tensors(capsys) -> None:
    flags = ["--memory", "2MiB", "--depth", "2", "--hidden-dim", "100"]
    cpu = _fit(flags, capsys)
    cuda = _fit([*flags, "--device-kind", "cuda"], capsys)
    assert cuda["max_batch_size"] < cpu["max_batch_size"] and "the CUDA context" in cuda["cannot_see"][0]


def test_the_search_finds_the_boundary_of_any_monotone_peak() -> None:
    for boundary in (1, 2, 3, 1000, 12345):
        found, peak, next_peak = largest_batch(lambda b: 10 * b, 10 * boundary)
        assert (found, peak, next_peak) == (boundary, 10 * boundary, 10 * boundary + 10)
    assert largest_batch(lambda b: 100, 99) == (None, None, 100)


@pytest.mark.parametrize("argv,flag", [(["--memory", "lots"], "--memory"), (["--memory", "1GiB", "--mode", "inference"],
                                                                            "--mode")])
def test_bad_input_is_one_line(argv: list[str], flag: str, capsys) -> None:
    assert main(["fit", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err
