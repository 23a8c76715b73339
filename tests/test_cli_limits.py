"""Every command refuses what it cannot do in one line that names the real limit: the flag
and what is allowed, exit status 2, no traceback. The cases come from the argparse parsers
themselves where they can (each command's strategy-parameter flags, MLP-only flags,
strategies, unknown flags), so a new command or flag is covered without a new test; the
hand-written ones are combinations a command refuses, and every command must have some.
Before, several of these ignored the flag in silence, blamed another flag (fit's
"--batch-size: 1 does not split evenly" for --strategy ddp), named an internal function
("allowed: predict_ranks"), or crashed with exit 3 (graph --amp, measure --amp --dtype)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from bpmem.cli import build_parser, main
from bpmem.cli.options import MLP_ONLY
from bpmem.spec import MLPSpec
from bpmem.strategies import registry
from bpmem.strategies.base import DEVICES, ONE_DEVICE

FIXTURE = Path(__file__).parent / "fixtures" / "results.csv"
USER = ["--model", "tests.fixtures.user_models:small_mlp", "--input", "float32[B,20]", "--target", "int64[B]<5"]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = _subcommands()


def _options(command: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in COMMANDS[command]._actions if a.option_strings}


def _needs(command: str) -> list[str]:
    """What a command needs to get past argparse: its required options."""
    if command == "allocator":
        return ["replay", str(SNAPSHOT)]
    return ["--memory", "1MiB"] if command == "fit" else []


def _other_value(action: argparse.Action) -> str | None:
    """A value for ``action`` that is not its default (None for a flag without one)."""
    if action.choices:
        return next(c for c in action.choices if c != action.default)
    if isinstance(action.default, bool) or action.nargs == 0:
        return None
    if isinstance(action.default, int):
        return str(action.default + 1)
    return "0.5"


# -- combinations each command refuses (the real limit named) ------------------------------------

SNAPSHOT = Path(__file__).resolve().parents[1] / "reports" / "gpu-example" / "trace" / "step.pickle"
HAND: dict[str, list[tuple[list[str], str, list[str]]]] = {
    "allocator": [
        (["--alloc-conf", "max_split_size_mb:4"], "--alloc-conf", ["too small", "allowed: above 20"]),
        (["--alloc-conf", "expandable_segments:1"], "--alloc-conf", ["allowed: True, False"]),
        (["--device-memory", "much"], "--device-memory", ["not a size", "allowed:", "80GiB"]),
    ],
    "estimate": [
        (["--arithmetic", *USER], "--arithmetic", ["MLP only", "allowed:", "fake tensors"]),
        (["--arithmetic", "--amp", "bfloat16"], "--arithmetic", ["full precision", "allowed: --amp none"]),
        (["--amp", "float16", "--dtype", "float64"], "--dtype", ["autocast keeps float32", "allowed: float32"]),
        (["--blocks", "layers"], "--blocks", ["only with --model"]),
        (["--strategy", "checkpoint-sqrt", "--budget", "0.5"], "--budget",
         ["not a parameter of checkpoint-sqrt", "allowed: --budget with --strategy checkpoint-budget"]),
    ],
    "measure": [
        (["--amp", "float16", "--dtype", "float64"], "--dtype", ["autocast keeps float32", "allowed: float32"]),
        (["--trace", "t.pickle", "--mode", "inference"], "--trace", ["allowed: --mode train"]),
        (["--device", "tpu"], "--device", ["allowed: cpu, cuda"]),
    ],
    "fit": [
        (["--batch-size", "8"], "--batch-size", ["searches the batch size itself", "allowed: leave it out"]),
        (["--mode", "inference"], "--mode", ["allowed: train"]),
        (["--memory", "lots"], "--memory", ["allowed:", "80GiB"]),
        (["--amp", "float16", "--dtype", "float64"], "--dtype", ["autocast keeps float32", "allowed: float32"]),
        (["--strategy", "tensor-parallel"], "--strategy", ["one device's step", "allowed: none"]),
    ],
    "graph": [
        (["--model", "bpmem.models.gpt:make_gpt", "--data", "bpmem.models.gpt:make_batch"], "--model",
         ["draws only the MLP", "allowed: --model mlp"]),
        (["--amp", "bfloat16"], "--amp", ["full-precision", "allowed: none"]),
        (["--optimizer", "adam"], "--optimizer", ["optimizer has no part", "allowed: leave --optimizer out"]),
        (["--strategy", "compile-budget"], "--strategy", ["compiles the step", "allowed: none"]),
        (["--mode", "hvp", "--strategy", "checkpoint-sqrt"], "--mode", ["allowed: train, inference"]),
    ],
    "run": [
        (["--jobs", "0"], "--jobs", ["allowed: an integer >= 1"]),
        (["--resume", "--overwrite"], "--overwrite", ["not allowed with --resume", "allowed: one of them"]),
        (["--resume", "--out", "{tmp}/nothing"], "--resume", ["no earlier run", "allowed: --out DIR"]),
        (["--shard", "3/2"], "--shard", ["allowed: K/N"]),
    ],
    "report": [
        (["{tmp}/run", "--out", "{tmp}/merged"], "--out", ["only with several DIRs", "allowed: bpmem report DIR"]),
        (["{tmp}/run", "{tmp}/run"], "--out", ["several run folders", "allowed: --out MERGED"]),
        (["{tmp}/nothing"], "DIR", ["no results.csv", "allowed:"]),
    ],
    "check": [
        (["--predicted", str(FIXTURE), "--baseline", str(FIXTURE)], "--predicted",
         ["not allowed with --baseline", "allowed:"]),
        (["--baseline", str(FIXTURE)], "--results", ["required", "allowed:"]),
        (["--baseline", str(FIXTURE), "--results", str(FIXTURE), "--fail", "bogus:1%"], "--fail",
         ["not a rule", "allowed:"]),
    ],
}


# -- generated from the parsers and the registry ------------------------------------------------

def _parameter_cases() -> list[tuple[list[str], str, list[str]]]:
    """A strategy's parameter flag given to a strategy that takes none: names the ones that do."""
    cases = []
    for command in COMMANDS:
        for name in registry.parameters():
            if name not in _options(command):
                continue
            takers = [s for s in registry.STRATEGIES if name in registry.parameters(s)]
            flag = f"--{name.replace('_', '-')}"
            action = _options(command)[name]
            value = action.choices[0] if action.choices else "0.5" if action.type.__name__ == "budget_type" else "2"
            cases.append(([command, *_needs(command), "--strategy", registry.PLAIN, flag, value], flag,
                          [f"--strategy {takers[0]}", "not a parameter of none"]))
    return cases


def _mlp_only_cases() -> list[tuple[list[str], str, list[str]]]:
    """A flag that shapes the MLP given with --model: refused, never ignored."""
    cases = []
    for command in COMMANDS:
        options = _options(command)
        if "model" not in options:
            continue
        for name in MLP_ONLY:
            action = options[name]
            value = _other_value(action)
            given = [action.option_strings[0], value] if value is not None else (
                ["--bias"] if not MLPSpec().bias else ["--no-bias"])
            # graph draws only the MLP: --model itself is what it refuses first
            flag = "--model" if command == "graph" else given[0]
            cases.append(([command, *_needs(command), *USER, *given], flag, ["MLP", "allowed"]))
    return cases


def _strategy_cases() -> list[tuple[list[str], str, list[str]]]:
    """The strategies a command cannot run, from the registry's placements."""
    refused = {
        "graph": [s for s in registry.STRATEGIES
                  if registry.REGISTRY[s].placement != ONE_DEVICE or registry.REGISTRY[s].compiles],
        "fit": [s for s in registry.STRATEGIES if registry.REGISTRY[s].placement != ONE_DEVICE],
        "measure": [s for s in registry.STRATEGIES if registry.REGISTRY[s].placement not in (ONE_DEVICE, DEVICES)],
    }
    allowed = {"graph": registry.PLAIN, "fit": registry.PLAIN, "measure": "model-parallel and the single-device"}
    return [([command, *_needs(command), "--strategy", name], "--strategy", ["allowed", allowed[command]])
            for command, names in refused.items() for name in names]


GENERATED = _parameter_cases() + _mlp_only_cases() + _strategy_cases()


def _check(code: int, err: str, flag: str, words: list[str]) -> None:
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err
    assert f"argument {flag}" in err, (flag, err)
    for word in words:
        assert word in err, (word, err)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def test_every_command_has_refusals_written_for_it() -> None:
    assert set(HAND) == set(COMMANDS), "add the combinations a new command refuses to HAND"


@pytest.mark.parametrize(("command", "argv", "flag", "words"),
                         [(c, argv, flag, words) for c, cases in HAND.items() for argv, flag, words in cases],
                         ids=[f"{c}-{' '.join(a)[:40]}" for c, cases in HAND.items() for a, _, _ in cases])
def test_a_refused_combination_names_its_limit(command: str, argv: list[str], flag: str, words: list[str],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    shutil.copy(FIXTURE, tmp_path / "run" / "results.csv")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    needs = [] if "--memory" in argv else _needs(command)
    code, err = _run([command, *needs, *argv], capsys)
    _check(code, err, flag, words)


@pytest.mark.parametrize(("argv", "flag", "words"), GENERATED, ids=[" ".join(a)[:60] for a, _, _ in GENERATED])
def test_a_flag_a_command_does_not_support_names_its_limit(argv: list[str], flag: str, words: list[str],
                                                           capsys) -> None:
    code, err = _run(argv, capsys)
    _check(code, err, flag, words)


def test_the_generated_cases_cover_every_command_with_model_flags() -> None:
    commands = {argv[0] for argv, _, _ in GENERATED}
    assert commands == {c for c in COMMANDS if "strategy" in _options(c)}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unknown_flag_is_one_line(command: str, capsys) -> None:
    positional = ["DIR"] if command == "report" else []
    code, err = _run([command, *_needs(command), *positional, "--no-such-flag"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--no-such-flag" in err, err
