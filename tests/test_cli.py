"""The ``bpmem`` command line: JSON shape, estimate against measure, errors, help and tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bpmem
from bpmem.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent

FIGURES = (
    "params_bytes",
    "grads_bytes",
    "optimizer_bytes",
    "saved_activation_bytes",
    "peak_bytes",
    "inference_peak_bytes",
)
CONFIG_KEYS = (
    "input_dim", "hidden_dim", "output_dim", "depth", "bias", "activation", "loss", "dtype", "l2",
    "batch_size", "optimizer", "mode", "strategy",
)


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit status, stdout, stderr), SystemExit included."""
    capsys.readouterr()  # drop anything printed before
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    code, out, err = _run(capsys, [*argv, "--json"])
    assert code == 0, err
    assert err == ""
    return json.loads(out)  # exactly one JSON document, nothing else on stdout


def _subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "bpmem", *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=120)


# ---------------------------------------------------------------------------------------------
# estimate --json


def test_estimate_json_has_every_figure_config_and_environment(capsys):
    data = _json(capsys, ["estimate"])
    assert isinstance(data, dict)
    for key in FIGURES:
        assert key in data
    for key, value in data.items():
        if key.endswith("_bytes"):
            assert type(value) is int, (key, value)
    assert isinstance(data["per_layer"], list) and data["per_layer"]
    for row in data["per_layer"]:
        assert isinstance(row["name"], str)
        assert type(row["saved_bytes"]) is int and row["saved_bytes"] >= 0
    # the seed's network, 784 -> 256 -> 10, no bias, float32
    assert data["params_bytes"] == (784 * 256 + 256 * 10) * 4
    assert data["grads_bytes"] == data["params_bytes"]
    assert data["optimizer_bytes"] == 0  # plain SGD keeps no state
    assert data["saved_activation_bytes"] == sum(row["saved_bytes"] for row in data["per_layer"])
    assert data["inference_peak_bytes"] < data["peak_bytes"]

    config = data["config"]
    for key in CONFIG_KEYS:
        assert key in config, key
    assert (config["input_dim"], config["hidden_dim"], config["output_dim"]) == (784, 256, 10)
    assert config["batch_size"] == 64 and config["optimizer"] == "sgd"
    assert config["mode"] == "train" and config["strategy"] == "none"

    env = data["environment"]
    assert env["torch_version"] == torch.__version__
    assert env["bpmem_version"] == bpmem.__version__
    assert "python_version" in env and "git_commit" in env


def test_estimate_json_config_echoes_every_flag(capsys):
    flags = {
        "--input-dim": "20", "--hidden-dim": "8", "--output-dim": "3", "--depth": "2",
        "--activation": "tanh", "--dtype": "float64", "--loss": "mse", "--l2": "0.5",
        "--batch-size": "5", "--optimizer": "adam", "--mode": "train", "--strategy": "none",
    }
    argv = ["estimate", "--bias", *(item for pair in flags.items() for item in pair)]
    data = _json(capsys, argv)
    config = data["config"]
    assert config["bias"] is True
    for flag, text in flags.items():
        key = flag.removeprefix("--").replace("-", "_")
        expected = type(config[key])(text) if not isinstance(config[key], str) else text
        assert config[key] == expected, (key, config[key], text)
    # independent formula: Linear 20->8, 8->8, 8->3, each with a bias, 8 bytes per float64
    assert data["params_bytes"] == (20 * 8 + 8 + 8 * 8 + 8 + 8 * 3 + 3) * 8
    # adam: exp_avg and exp_avg_sq like the params, plus a 0-dim float32 step per parameter (6 of them)
    assert data["optimizer_bytes"] == 2 * data["params_bytes"] + 6 * 4


def test_estimate_json_inference_mode_has_no_training_state(capsys):
    data = _json(capsys, ["estimate", "--mode", "inference", "--optimizer", "adam"])
    assert data["params_bytes"] == (784 * 256 + 256 * 10) * 4
    assert data["grads_bytes"] == data["optimizer_bytes"] == data["saved_activation_bytes"] == 0
    assert data["peak_bytes"] == data["inference_peak_bytes"]
    assert data["per_layer"] == []


# ---------------------------------------------------------------------------------------------
# estimate meets measure

FLAG_SETS = {
    "defaults": [],
    "bias-gelu-mse-adam-depth3": ["--bias", "--activation", "gelu", "--loss", "mse", "--optimizer", "adam",
                                  "--depth", "3", "--batch-size", "7"],
    "bfloat16-momentum": ["--dtype", "bfloat16", "--optimizer", "sgd-momentum"],
    "tanh-float64-small": ["--activation", "tanh", "--dtype", "float64", "--input-dim", "30",
                           "--hidden-dim", "12", "--output-dim", "4", "--depth", "2", "--batch-size", "5"],
    "inference": ["--mode", "inference"],
}


@pytest.mark.parametrize("flags", FLAG_SETS.values(), ids=FLAG_SETS.keys())
def test_estimate_meets_measure(capsys, flags):
    est = _json(capsys, ["estimate", *flags])
    mea = _json(capsys, ["measure", *flags])
    for key in FIGURES:
        assert type(mea[key]) is int, key
        assert est[key] == mea[key], (key, est[key], mea[key])
    assert est["per_layer"] == mea["per_layer"]
    if "inference" not in flags:
        assert est["peak_phase"] == mea["peak_phase"]
    config_keys = set(CONFIG_KEYS)
    assert {k: est["config"][k] for k in config_keys} == {k: mea["config"][k] for k in config_keys}
    assert mea["config"]["device"] == "cpu"
    assert mea["environment"]["device"] == "cpu"


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line on stderr naming the flag and what it accepts, no traceback

BAD_INPUTS = {
    "hidden-dim-negative": (["estimate", "--hidden-dim", "-5"], "--hidden-dim", [">= 1"]),
    "input-dim-zero": (["estimate", "--input-dim", "0"], "--input-dim", [">= 1"]),
    "activation": (["estimate", "--activation", "foo"], "--activation", ["relu", "tanh", "sigmoid", "gelu"]),
    "dtype": (["measure", "--dtype", "float23"], "--dtype", ["float32", "float64", "bfloat16", "float16"]),
    "loss": (["estimate", "--loss", "hinge"], "--loss", ["cross_entropy", "mse"]),
    "optimizer": (["estimate", "--optimizer", "rmsprop"], "--optimizer", ["sgd", "sgd-momentum", "adam"]),
    "batch-size-text": (["measure", "--batch-size", "x"], "--batch-size", [">= 1"]),
    "l2-negative": (["estimate", "--l2", "-1"], "--l2", [">= 0"]),
    "device-cuda-7": (["measure", "--device", "cuda:7"], "--device", ["cpu"]),
    "device-tpu": (["measure", "--device", "tpu"], "--device", ["cpu", "cuda"]),
    "world-size-one": (["estimate", "--strategy", "ddp", "--world-size", "1"], "--world-size", [">= 2"]),
    "parameter-of-another-strategy": (["estimate", "--strategy", "checkpoint-sqrt", "--segments", "3"], "--segments",
                                      ["checkpoint-sqrt", "no parameters"]),
    "world-size-too-big": (["estimate", "--strategy", "model-parallel", "--world-size", "3"], "--depth",
                           ["depth >= 2"]),
    "measure-under-torchrun": (["measure", "--strategy", "fsdp", "--world-size", "2"], "--strategy",
                               ["torchrun", "model-parallel"]),
}


def _check_error(code: int, out: str, err: str, flag: str, allowed: list[str]) -> None:
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert "Traceback" not in err
    assert flag in err
    assert "error" in err
    for value in allowed:
        assert value in err, (value, err)


@pytest.mark.parametrize(("argv", "flag", "allowed"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_exit_2(capsys, argv, flag, allowed):
    if flag == "--device" and "cuda" in argv[-1] and torch.cuda.is_available():
        pytest.skip("cuda:7 is only known to be unusable on a machine without CUDA")
    code, out, err = _run(capsys, argv)
    _check_error(code, out, err, flag, allowed)


@pytest.mark.parametrize("case", ["hidden-dim-negative", "activation", "device-tpu"])
def test_bad_input_in_a_real_process_has_no_traceback(case):
    argv, flag, allowed = BAD_INPUTS[case]
    proc = _subprocess(*argv)
    _check_error(proc.returncode, proc.stdout, proc.stderr, flag, allowed)


def test_python_dash_m_bpmem_runs_the_cli(capsys):
    proc = _subprocess("estimate", "--json", "--depth", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    data = json.loads(proc.stdout)
    in_process = _json(capsys, ["estimate", "--depth", "2"])
    for key in FIGURES:
        assert data[key] == in_process[key]
    assert data["per_layer"] == in_process["per_layer"]
    assert data["config"]["depth"] == 2


def test_missing_command_is_an_error(capsys):
    code, out, err = _run(capsys, [])
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# help and tables


@pytest.mark.parametrize("command", ["estimate", "measure"])
def test_help_names_every_figure(capsys, command):
    code, out, err = _run(capsys, [command, "--help"])
    assert code == 0
    for name in (*FIGURES, "per_layer"):
        assert name in out, name
    for flag in ("--input-dim", "--hidden-dim", "--activation", "--dtype", "--optimizer", "--json"):
        assert flag in out
    if command == "measure":
        assert "--device" in out


def test_version_flag(capsys):
    code, out, _ = _run(capsys, ["--version"])
    assert code == 0
    assert bpmem.__version__ in out


@pytest.mark.parametrize("command", ["estimate", "measure"])
def test_table_uses_iec_units_and_matches_json(capsys, command):
    code, out, err = _run(capsys, [command])
    assert code == 0, err
    assert "KiB" in out or "MiB" in out
    assert "kB" not in out
    data = _json(capsys, [command])
    # every figure also appears as an exact, comma-grouped byte count
    for key in ("params_bytes", "peak_bytes", "inference_peak_bytes"):
        assert f"{data[key]:,} B" in out, key
    assert "784-256-10" in out


def test_estimate_never_imports_torch():
    """Why estimate is instant at any size: it is arithmetic, and torch is not even loaded."""
    code = ("import sys, bpmem.cli; bpmem.cli.main(['estimate', '--batch-size', '1000000', '--hidden-dim', "
            "'8192', '--depth', '8', '--json']); assert 'torch' not in sys.modules, 'torch was imported'")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["saved_activation_bytes"] > 0


def test_estimate_of_a_split_strategy_gives_every_rank(capsys):
    """One entry per rank; for DDP each holds the whole model, for 1F1B the stages share it out."""
    ddp = _json(capsys, ["estimate", "--strategy", "ddp", "--world-size", "2"])
    plain = _json(capsys, ["estimate"])
    assert [r["rank"] for r in ddp["ranks"]] == [0, 1]
    assert all(r["params_bytes"] == plain["params_bytes"] for r in ddp["ranks"])
    # the top-level figures are what the fullest device holds
    assert ddp["saved_activation_bytes"] == max(r["saved_activation_bytes"] for r in ddp["ranks"])
    pipe = _json(capsys, ["estimate", "--strategy", "pipeline-1f1b", "--world-size", "2", "--depth", "3"])
    whole = _json(capsys, ["estimate", "--depth", "3"])
    assert sum(r["params_bytes"] for r in pipe["ranks"]) == whole["params_bytes"]


def test_measure_model_parallel_reports_each_stage(capsys):
    data = _json(capsys, ["measure", "--strategy", "model-parallel", "--world-size", "2", "--depth", "3",
                          "--batch-size", "8"])
    predicted = _json(capsys, ["estimate", "--depth", "3", "--batch-size", "8"])
    assert [stage["rank"] for stage in data["ranks"]] == [0, 1]
    assert sum(stage["params_bytes"] for stage in data["ranks"]) == predicted["params_bytes"]
    assert sum(stage["saved_activation_bytes"] for stage in data["ranks"]) == predicted["saved_activation_bytes"]


# ---------------------------------------------------------------------------------------------
# --json is strict JSON: no NaN or Infinity, which JSON has not got (null instead)

def _strict_json(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("argv", [
    ["estimate"], ["estimate", "--amp", "bfloat16"],
    ["estimate", "--model", "tests.fixtures.user_models:small_mlp", "--input", "float32[B,20]", "--target",
     "int64[B]<5"],
    ["measure", "--batch-size", "4"], ["fit", "--memory", "64KiB"],
], ids=["estimate", "estimate-amp", "estimate-model", "measure", "fit"])
def test_json_output_is_strict(capsys, argv):
    code, out, err = _run(capsys, [*argv, "--json"])
    assert code == 0, err
    document = _strict_json(out)
    if "--amp" in argv or "--model" in argv:  # a step on fake tensors has no loss to report: null, not NaN
        assert "loss" in document and document["loss"] is None


def test_print_json_writes_null_for_every_non_finite_number(capsys):
    from bpmem.cli.options import print_json

    print_json({"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf")}], "d": (2, float("nan"))})
    assert _strict_json(capsys.readouterr().out) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, None]}
