"""Your own model: ``bpmem estimate --model`` (fake tensors, no memory) equals ``bpmem measure
--model`` (real tensors) to the byte; bad input is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bpmem.cli import main
from bpmem.figures import PREDICTED_FIGURES
from bpmem.measurement.cell import DataDependentModel, measure
from bpmem.models.user_model import TensorShape, UserModel, UserModelError
from bpmem.predict.estimate import estimate
from bpmem.spec import MLPSpec
from bpmem.strategies.registry import make_step

ROOT = Path(__file__).resolve().parents[1]
GPT = UserModel("bpmem.models.gpt:make_gpt", data="bpmem.models.gpt:make_batch", blocks_path="blocks")
SHAPES = UserModel("tests.fixtures.user_models:small_mlp", inputs=(TensorShape.parse("float32[B,20]", "--input"),),
                   target=TensorShape.parse("int64[B]<5", "--target"))


def _figures(measured: object) -> dict[str, int]:
    return {name: getattr(measured, name) for name in PREDICTED_FIGURES}


# the zoo and the examples at three batch sizes in every mode: tests/test_zoo_models.py
@pytest.mark.parametrize("workload", [SHAPES, pytest.param(GPT, marks=pytest.mark.slow)], ids=["shapes", "gpt"])
@pytest.mark.parametrize("mode,optimizer", [("train", "sgd"), ("train", "sgd-momentum"), ("inference", "sgd")])
@pytest.mark.parametrize("batch_size", [3])
def test_the_estimate_without_data_equals_the_measurement(workload: UserModel, mode: str, optimizer: str,
                                                          batch_size: int) -> None:
    step = make_step(batch_size=batch_size, mode=mode, optimizer=optimizer)
    real, fake = measure(workload, step), measure(workload, step, fake=True)
    assert _figures(fake) == _figures(real)
    assert fake.per_layer == real.per_layer  # attributed to the same modules, by path
    assert fake.caveats == []


def test_on_the_mlp_the_fake_run_equals_the_arithmetic() -> None:
    """Three independent routes to one number: real tensors, fake tensors, autograd's rules."""
    spec, step = MLPSpec(depth=3, bias=True, activation="gelu"), make_step(batch_size=16, optimizer="adam")
    assert _figures(measure(spec, step, fake=True)) == _figures(measure(spec, step)) == _figures(estimate(spec, step))


def test_a_model_that_returns_its_loss_with_two_inputs() -> None:
    workload = UserModel("tests.fixtures.user_models:scalar_loss", data="tests.fixtures.user_models:two_inputs",
                         loss="none")
    step = make_step(batch_size=4, optimizer="adam")
    assert _figures(measure(workload, step, fake=True)) == _figures(measure(workload, step))


def test_a_data_dependent_forward_is_a_clear_error() -> None:
    workload = UserModel("tests.fixtures.user_models:masked_mean",
                         inputs=(TensorShape.parse("float32[B,20]", "--input"),),
                         target=TensorShape.parse("float32[B,5]", "--target"), loss="mse")
    with pytest.raises(DataDependentModel, match="depends on the data.*bpmem measure --model"):
        measure(workload, make_step(batch_size=4), fake=True)
    assert measure(workload, make_step(batch_size=4)).peak_bytes > 0  # measured for real, it runs


@pytest.mark.slow  # dozens of fake-tensor steps
def test_the_gpt_at_a_million_rows_is_estimated_in_little_memory() -> None:
    """Fake tensors hold no data: batch 1,000,000 costs what batch 1 does (checked in a fresh
    process: its peak resident set). The peak is VmHWM, the high-water mark of the process's
    own memory map. Not getrusage's ru_maxrss: Linux carries that over from the parent at
    fork and keeps it across exec, so the child would report this test process's size,
    which grows as the suite runs (a full run read 1.0 GiB where the estimate used 0.3)."""
    script = ("import json, re\nfrom pathlib import Path\nfrom bpmem.cli import main\n"
              "import contextlib, io\nbuf = io.StringIO()\n"
              "with contextlib.redirect_stdout(buf):\n"
              "    code = main(['estimate', '--model', 'bpmem.models.gpt:make_gpt', '--data', "
              "'bpmem.models.gpt:make_batch', '--batch-size', '1000000', '--json'])\n"
              "out = json.loads(buf.getvalue())\n"
              "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1)\n"
              "print(json.dumps({'code': code, 'peak': out['peak_bytes'], 'rss_kib': int(hwm)}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["code"] == 0 and outcome["peak"] > 2**40  # terabytes predicted...
    assert outcome["rss_kib"] < 2**20  # ...in under 1 GiB of this process


GPT_FLAGS = ["--model", "bpmem.models.gpt:make_gpt", "--data", "bpmem.models.gpt:make_batch"]
BAD = {
    "no-colon": (["estimate", "--model", "bpmem.models.gpt", "--data", "x:y"], "--model", "MODULE:NAME"),
    "no-module": (["estimate", "--model", "nowhere.at_all:make", "--data", "x:y"], "--model", "cannot import"),
    "no-name": (["estimate", "--model", "bpmem.models.gpt:make_gtp", "--data", "bpmem.models.gpt:make_batch"],
                "--model", "has no 'make_gtp'"),
    "factory-raises": (["measure", "--model", "tests.fixtures.user_models:raises", "--input", "float32[B,20]",
                        "--target", "int64[B]<5"], "--model", "raised ValueError: no such checkpoint"),
    "not-a-module": (["measure", "--model", "tests.fixtures.user_models:not_a_module", "--input", "float32[B,20]",
                      "--target", "int64[B]<5"], "--model", "returned str"),
    "wrong-batch": (["measure", "--model", "tests.fixtures.user_models:small_mlp", "--data",
                     "tests.fixtures.user_models:wrong_batch"], "--data", "(inputs, target)"),
    "no-data": (["estimate", "--model", "bpmem.models.gpt:make_gpt"], "--data", "--input"),
    "bad-shape": (["estimate", "--model", "tests.fixtures.user_models:small_mlp", "--input", "float32(B,20)",
                   "--target", "int64[B]<5"], "--input", "DTYPE[DIMS]"),
    "integer-without-range": (["estimate", "--model", "tests.fixtures.user_models:small_mlp", "--input",
                               "float32[B,20]", "--target", "int64[B]"], "--target", "needs a range"),
    "kwargs-not-json": (["estimate", *GPT_FLAGS, "--model-kwargs", "{layers: 2}"], "--model-kwargs", "JSON"),
    "no-chain": (["estimate", "--model", "tests.fixtures.user_models:scalar_loss", "--data",
                  "tests.fixtures.user_models:two_inputs", "--loss", "none", "--strategy", "checkpoint-sqrt"],
                 "--blocks", "not an nn.Sequential and has no ModuleList"),
    "mlp-with-data": (["estimate", "--data", "bpmem.models.gpt:make_batch"], "--data", "--model"),
    "data-dependent": (["estimate", "--model", "tests.fixtures.user_models:masked_mean", "--input",
                        "float32[B,20]", "--target", "float32[B,5]", "--loss", "mse"], "model", "bpmem measure"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case: str, capsys) -> None:
    argv, flag, words = BAD[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and words in err, err


def test_the_shape_parser_names_what_it_accepts() -> None:
    assert TensorShape.parse("int64[B, 7]<10", "--target") == TensorShape("int64", ("B", 7), 10)
    with pytest.raises(UserModelError, match="dimension '0'"):
        TensorShape.parse("float32[B,0]", "--input")


@pytest.mark.parametrize("argv,words", [
    (["--strategy", "tensor-parallel"], "splits the MLP only"),
    (["--strategy", "pipeline-gpipe"], "needs an nn.Sequential model"),
])
def test_a_strategy_that_cannot_apply_says_what_it_needs(argv: list[str], words: str, capsys) -> None:
    assert main(["estimate", *GPT_FLAGS, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_your_own_models_compile_budget_step_is_estimated_on_fake_tensors_exactly() -> None:
    """torch.compile runs on fake tensors too, and the live probe sees its graphs' ops: the
    estimate (no memory) equals the measurement, saved bytes and peak."""
    step = make_step(batch_size=8, strategy="compile-budget", budget=0.5)
    predicted, measured = measure(SHAPES, step, fake=True), measure(SHAPES, step)
    assert (predicted.peak_bytes, predicted.saved_activation_bytes) == (measured.peak_bytes,
                                                                       measured.saved_activation_bytes)
    # the compiled graphs' own step, not an eager fallback (which would read the plain peak)
    assert measured.peak_bytes != measure(SHAPES, make_step(batch_size=8)).peak_bytes


def test_blocks_that_are_not_a_chain_are_one_line(capsys) -> None:
    argv = ["estimate", "--model", "tests.fixtures.user_models:not_a_chain", "--input", "float32[B,20]",
            "--target", "int64[B]<5", "--blocks", "blocks", "--strategy", "checkpoint-segments", "--segments", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot checkpoint them as a chain" in err and "--blocks" in err, err


SWEEP = '''name = "mine"
batch_sizes = [2, 6]
modes = ["train", "inference"]
strategies = ["none", "checkpoint-sqrt"]
repeats = 1
warmup = 0

[model]
factory = "tests.fixtures.user_models:small_mlp"
kwargs = [{ width = 8 }, { width = 24 }]
input = "float32[B,20]"
target = "int64[B]<5"
'''


@pytest.mark.slow  # a whole sweep and its report
def test_a_sweep_of_your_own_model_predicts_every_row(tmp_path: Path, capsys) -> None:
    config = tmp_path / "mine.toml"
    config.write_text(SWEEP)
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    rows = list(__import__("csv").DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 2 * 3 and {r["status"] for r in rows} == {"ok"}  # 2 kwargs x 2 batches x 3 kinds
    assert {r["model"] for r in rows} == {"tests.fixtures.user_models:small_mlp"}
    assert {r["model_kwargs"] for r in rows} == {'{"width": 8}', '{"width": 24}'} and {r["depth"] for r in rows} == {""}
    for row in rows:
        for name in PREDICTED_FIGURES:
            assert row[name] == row[f"predicted_{name}"], (row["cell_id"], name)
    assert (out / "report.md").exists()
    capsys.readouterr()
    assert main(["check", "--predicted", str(out), "--fail", "saved:0%", "--fail", "peak:0%"]) == 0


def test_two_model_tables_are_two_grids(tmp_path: Path) -> None:
    """[[model]] twice: each model with its own factory and data, cells one grid after the other."""
    from bpmem.sweep.config import load_config

    text = SWEEP.replace("[model]\n", "[[model]]\n") + (
        '\n[[model]]\nfactory = "bpmem.models.resnet:make_resnet"\ndata = "bpmem.models.resnet:make_batch"\n')
    config = tmp_path / "two.toml"
    config.write_text(text)
    cells = load_config(config).cells()
    factories = [c.spec.factory for c in cells]
    assert factories == sorted(factories, key=lambda f: "resnet" in f)  # the first grid's cells come first
    assert factories.count("bpmem.models.resnet:make_resnet") == 2 * 3  # 2 batches x (2 strategies + inference)
    assert factories.count("tests.fixtures.user_models:small_mlp") == 2 * 2 * 3  # and 2 kwargs


@pytest.mark.parametrize("change,key", [
    ('depth = 3\n', "model.depth"),
    ('', "model.factory"),
    ('kwargs = 3\n', "model.kwargs"),
])
def test_a_bad_model_table_names_its_key(change: str, key: str, tmp_path: Path, capsys) -> None:
    text = SWEEP.replace("kwargs = [{ width = 8 }, { width = 24 }]\n", change)
    if key == "model.factory":
        text = text.replace("small_mlp", "no_such_factory")
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert key in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # refused before any output


def test_a_split_strategy_on_your_own_model_is_refused_only_where_it_splits_the_mlp_alone(tmp_path: Path,
                                                                                          capsys) -> None:
    """tensor-parallel splits the MLP's Linear pairs: refused before any output; ddp splits any
    model (it runs, one row per rank: tests/test_user_model_split.py)."""
    from bpmem.sweep.config import load_config

    config = tmp_path / "split.toml"
    config.write_text(SWEEP.replace('strategies = ["none", "checkpoint-sqrt"]', 'strategies = ["tensor-parallel"]'))
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "strategies: tensor-parallel splits the MLP only" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
    config.write_text(SWEEP.replace('strategies = ["none", "checkpoint-sqrt"]', 'strategies = ["ddp"]'))
    cells = load_config(config).cells()
    assert {(c.step.strategy.name, c.step.world_size) for c in cells} == {("ddp", 2)} and len(cells) == 4


KNOWN_DIVERGENT = {
    # the CPU runs a fused (oneDNN) LSTM kernel that saves a workspace the fake run never makes
    "lstm": UserModel("tests.fixtures.user_models:lstm_classifier",
                      inputs=(TensorShape.parse("int64[B,12]<100", "--input"),),
                      target=TensorShape.parse("int64[B]<3", "--target")),
}


@pytest.mark.slow
def test_a_transformer_encoder_with_dropout_is_estimated_exactly() -> None:
    """nn.TransformerEncoder checks its parameters before choosing its fast path; built on the
    meta device and then made fake, the fake run takes the real run's path."""
    encoder = UserModel("tests.fixtures.user_models:transformer_encoder",
                        inputs=(TensorShape.parse("float32[B,16,64]", "--input"),),
                        target=TensorShape.parse("float32[B,16,64]", "--target"), loss="mse")
    for mode in ("train", "inference"):
        step = make_step(batch_size=8, mode=mode, optimizer="adam")
        fake = measure(encoder, step, fake=True)
        assert _figures(fake) == _figures(measure(encoder, step)) and fake.caveats == []


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known gap: the fake run takes another kernel than the CPU does; "
                                       "measure these models (docs/own-models.md)")
@pytest.mark.parametrize("name", list(KNOWN_DIVERGENT))
def test_models_whose_estimate_is_known_to_differ(name: str) -> None:
    step = make_step(batch_size=8, optimizer="adam")
    workload = KNOWN_DIVERGENT[name]
    assert _figures(measure(workload, step, fake=True)) == _figures(measure(workload, step))


def test_an_estimate_that_read_data_pointers_says_it_may_differ() -> None:
    pointer = UserModel("tests.fixtures.user_models:pointer_branch",
                        inputs=(TensorShape.parse("float32[B,20]", "--input"),),
                        target=TensorShape.parse("int64[B]<5", "--target"))
    estimated = measure(pointer, make_step(batch_size=2), fake=True)
    assert len(estimated.caveats) == 1 and "bpmem measure --model" in estimated.caveats[0]
