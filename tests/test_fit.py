"""``bpmem fit``: its answer is checked by measuring, for real, at the batch it reports and at
the next one: the first fits the budget and the second does not."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpmem.cli import main
from bpmem.measurement.cell import measure
from bpmem.models.user_model import TensorShape, UserModel
from bpmem.predict.fit import largest_batch
from bpmem.spec import MLPSpec
from bpmem.strategies.registry import make_step

UNET = UserModel("tests.fixtures.user_models:small_unet", data="tests.fixtures.user_models:images")
SHAPES = UserModel("tests.fixtures.user_models:small_mlp", inputs=(TensorShape.parse("float32[B,20]", "--input"),),
                   target=TensorShape.parse("int64[B]<5", "--target"))


def _fit(argv: list[str], capsys) -> dict:
    assert main(["fit", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_a_checkpointed_mlp_fits_at_the_batch_the_dry_run_reports_and_not_at_the_next() -> None:
    """checkpoint-sqrt's peak has no exact arithmetic: fit asks the dry run on fake tensors,
    and the measured step fits at the batch it reports and not at the next."""
    from bpmem.predict.fit import fit

    spec, memory = MLPSpec(depth=3), 12 * 2**20
    [answer] = fit(spec, make_step("checkpoint-sqrt", optimizer="adam"), memory, [])
    batch = answer.max_batch_size
    fits = measure(spec, make_step("checkpoint-sqrt", batch_size=batch, optimizer="adam"))
    overflows = measure(spec, make_step("checkpoint-sqrt", batch_size=batch + 1, optimizer="adam"))
    assert answer.figure == "allocator_peak_bytes" and answer.calibration_error == 0
    assert fits.allocator_peak_bytes == answer.allocator_peak_bytes <= memory
    assert memory < overflows.allocator_peak_bytes == answer.next_allocator_peak_bytes
    assert (fits.peak_bytes, overflows.peak_bytes) == (answer.peak_bytes, answer.next_peak_bytes)


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_a_unet_fits_under_the_allocators_trace_not_only_by_its_tensors() -> None:
    """oneDNN's convolutions take scratch inside their kernels: searched by its tensors, the
    U-Net's answer would overflow the allocator. The allocator's measured peak fits at the
    answer and not at the next batch, and the answer names its calibration."""
    from bpmem.predict.fit import fit, largest_batch, predicted_peak

    step, memory = make_step(optimizer="adam"), 8 * 2**20
    [answer] = fit(UNET, step, memory, [])
    batch = answer.max_batch_size
    assert answer.figure == "allocator_peak_bytes" and "convolution" in answer.calibrated_ops
    fits, overflows = (measure(UNET, make_step(batch_size=b, optimizer="adam")) for b in (batch, batch + 1))
    assert fits.allocator_peak_bytes == answer.allocator_peak_bytes <= memory
    assert memory < overflows.allocator_peak_bytes == answer.next_allocator_peak_bytes
    by_tensors, _, _ = largest_batch(lambda b: predicted_peak(UNET, make_step(batch_size=b, optimizer="adam")), memory)
    assert by_tensors > batch  # what fit answered before the allocator's figure


def test_a_step_too_large_to_calibrate_is_searched_by_its_tensors_and_says_why(monkeypatch) -> None:
    import psutil

    from bpmem.predict.fit import fit

    class Scarce:
        available = 1000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Scarce())  # read when fit calibrates
    [answer] = fit(MLPSpec(depth=2), make_step(), 8 * 2**20, [])
    assert answer.figure == "peak_bytes" and answer.allocator_peak_bytes is None
    assert "calibrating needs a real step" in answer.not_calibrated and answer.max_batch_size > 0


@pytest.mark.slow  # every strategy, each a search of dry runs
# (a bare byte count such as "9876543" parses as test_units.py shows; one search is enough here)
def test_the_mlp_fits_at_the_batch_it_reports_and_not_at_the_next(capsys) -> None:
    answer = _fit(["--memory", "12MiB", "--depth", "3", "--optimizer", "adam"], capsys)
    batch, budget = answer["max_batch_size"], answer["memory_bytes"]
    spec = MLPSpec(depth=3)
    fits = measure(spec, make_step(batch_size=batch, optimizer="adam")).allocator_peak_bytes
    overflows = measure(spec, make_step(batch_size=batch + 1, optimizer="adam")).allocator_peak_bytes
    assert fits == answer["allocator_peak_bytes"] <= budget < overflows == answer["next_allocator_peak_bytes"]
    assert answer["figure"] == "allocator_peak_bytes" and answer["calibration_error"] == 0
    assert {s["strategy"] for s in answer["strategies"]} >= {"none", "checkpoint-sqrt", "microbatch"}


@pytest.mark.slow  # dozens of fake-tensor steps
def test_a_user_model_fits_at_the_batch_it_reports_and_not_at_the_next(capsys) -> None:
    answer = _fit(["--memory", "200KiB", "--model", SHAPES.factory, "--input", "float32[B,20]", "--target",
                   "int64[B]<5"], capsys)
    batch, budget = answer["max_batch_size"], answer["memory_bytes"]
    fits = measure(SHAPES, make_step(batch_size=batch)).allocator_peak_bytes
    overflows = measure(SHAPES, make_step(batch_size=batch + 1)).allocator_peak_bytes
    assert fits <= budget < overflows


@pytest.mark.slow  # dozens of fake-tensor steps
def test_cuda_blocks_count_more_than_cpu_tensors(capsys) -> None:
    """On CUDA the caching allocator's reserved peak and the context allowance are held to the
    budget: its 64 MiB cuBLAS workspace, 512 B blocks and 2 MiB segments leave fewer rows than
    the CPU's tensors do, and the next batch's reserved peak would pass the budget."""
    from bpmem.predict.fit import fit

    flags = ["--memory", "80MiB", "--depth", "2", "--hidden-dim", "100"]
    [cpu] = fit(MLPSpec(depth=2, hidden_dim=100), make_step(), 80 * 2**20, [])  # the plain step's answer alone
    cuda = _fit([*flags, "--device-kind", "cuda", "--cuda-context", "4MiB"], capsys)
    assert cuda["max_batch_size"] < cpu.max_batch_size and any("cuDNN" in line for line in cuda["cannot_see"])
    budget, context = cuda["memory_bytes"], cuda["cuda_context_bytes"]
    assert context == 4 * 2**20 and cuda["figure"] == "cuda_reserved_bytes"
    assert cuda["cuda_reserved_bytes"] + context <= budget < cuda["next_cuda_reserved_bytes"] + context
    assert cuda["cuda_reserved_bytes"] > 64 * 2**20 + cuda["peak_bytes"]  # the workspace's segment, and the step's


def test_the_search_finds_the_boundary_of_any_monotone_peak() -> None:
    for boundary in (1, 2, 3, 1000, 12345):
        found, peak, next_peak = largest_batch(lambda b: 10 * b, 10 * boundary)
        assert (found, peak, next_peak) == (boundary, 10 * boundary, 10 * boundary + 10)
    assert largest_batch(lambda b: 100, 99) == (None, None, 100)


@given(base=st.integers(0, 10**9), per_row=st.integers(1, 10**7), block=st.sampled_from([1, 512, 2 << 20, 20 << 20]),
       bumps=st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 10**8)), max_size=4),
       memory=st.integers(0, 10**11))
@settings(max_examples=300, deadline=None)
def test_the_secant_search_agrees_with_a_scan(base: int, per_row: int, block: int, bumps: list[tuple[int, int]],
                                              memory: int) -> None:
    """Any non-decreasing peak (affine, rounded up to blocks, with steps where a kernel or a
    segment size changes): the answer is the largest batch that fits, as a scan finds it."""
    def peak(b: int) -> int:
        raw = base + per_row * b + sum(jump for at, jump in bumps if b >= at)
        return -(-raw // block) * block

    found, there, after = largest_batch(peak, memory)
    if peak(1) > memory:
        assert (found, there, after) == (None, None, peak(1))
        return
    assert there == peak(found) <= memory < peak(found + 1) == after


def test_an_affine_peak_costs_four_probes() -> None:
    """1 and 2 give the line; the batch where it meets the budget and the one after verify it."""
    probed: list[int] = []

    def peak(b: int) -> int:
        probed.append(b)
        return 1_000_000 + 4096 * b

    assert largest_batch(peak, 80 * 2**30)[0] == (80 * 2**30 - 1_000_000) // 4096
    assert len(probed) == 4


@pytest.mark.parametrize("argv,flag", [(["--memory", "lots"], "--memory"), (["--memory", "1GiB", "--mode", "inference"],
                                                                            "--mode")])
def test_bad_input_is_one_line(argv: list[str], flag: str, capsys) -> None:
    assert main(["fit", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


@pytest.mark.slow  # a dozen fake steps
@pytest.mark.parametrize("strategy", ["none", "checkpoint-sqrt", "checkpoint-selective", "microbatch"])
def test_one_warm_fake_model_per_strategy_gives_each_batchs_estimate(strategy: str) -> None:
    """The search shares one warmed-up fake model per strategy across batches, in whatever
    order it probes them; each peak is still what ``estimate`` (a fresh dry run at that
    batch) gives."""
    from bpmem.predict.fit import TensorPeaks

    llama = UserModel("bpmem.models.llama:make_llama", kwargs_json='{"layers": 2}',
                      data="bpmem.models.llama:make_batch", blocks_path="layers")
    peaks = TensorPeaks(llama, make_step(strategy, batch_size=1, optimizer="adamw"), "cpu")
    for batch in (6, 2):  # the second after a larger one
        fresh = measure(llama, make_step(strategy, batch_size=batch, optimizer="adamw"), fake=True)
        assert peaks(batch) == fresh.peak_bytes
