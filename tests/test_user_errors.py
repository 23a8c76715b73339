"""An exception the user's own code raises (the factory, the data function, the model's
forward, torch's loss on its output) is the user's: one line, exit 2, the exception and the
user's file:line, no traceback; ``BPMEM_DEBUG=1`` shows it. A bug in bpmem stays exit 3,
even where it happens inside the user's forward. Each case here was exit 3, "internal
error: ... (a bug in bpmem)", or a misleading "argument --<PyTorch's words>" before."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

import bpmem.cli
import bpmem.measurement.cell
from bpmem.cli import main
from bpmem.cli.options import field_message

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULE = "bpmem_user_code_fixture"
SOURCE = textwrap.dedent('''\
    import torch
    from torch import nn

    import bpmem.units


    class RaisesKeyError(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            raise KeyError('x')  # LINE:forward


    class WrongWidth(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, x):
            return self.linear(x)  # LINE:linear


    class CallsBpmem(nn.Module):
        """A forward that calls into bpmem, whose own code then raises: bpmem's bug."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            bpmem.units.parse_bytes("not a size")
            return self.linear(x)


    class ReturnsTuple(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return self.linear(x), x


    class ReturnsHidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return {"hidden": self.linear(x), "logits": None}


    def key_error():
        return RaisesKeyError()


    def wrong_width():
        return WrongWidth()


    def calls_bpmem():
        return CallsBpmem()


    def returns_tuple():
        return ReturnsTuple()


    def returns_hidden():
        return ReturnsHidden()


    def batch_norm():
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


    def linear():
        return nn.Linear(4, 3)


    def factory_raises():
        raise RuntimeError("no weights here")  # LINE:factory


    def data(batch_size, device):
        return torch.randn(batch_size, 4, device=device), torch.randint(0, 3, (batch_size,), device=device)


    def data_raises(batch_size, device):
        raise ValueError("the data set is not mounted")  # LINE:data
''')


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("user_code")
    path = folder / f"{MODULE}.py"
    path.write_text(SOURCE)
    sys.path.insert(0, str(folder))
    yield path
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


def _line(tag: str) -> int:
    return next(n for n, text in enumerate(SOURCE.splitlines(), 1) if text.endswith(f"# LINE:{tag}"))


def _flags(factory: str, data: str = "data") -> list[str]:
    return ["--model", f"{MODULE}:{factory}", "--data", f"{MODULE}:{data}"]


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.err


def _one_line(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err
    for word in words:
        assert word in err, (word, err)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BPMEM_DEBUG", raising=False)


@pytest.mark.parametrize("command", ["estimate", "measure"])
def test_a_forward_that_raises_is_the_users_error(user_module: Path, command: str, capsys) -> None:
    code, err = _run(capsys, [command, *_flags("key_error")])
    _one_line(code, err, "argument --model", "raised KeyError: 'x'", f"{user_module.name}:{_line('forward')}",
              "RaisesKeyError.forward", "your code")


@pytest.mark.parametrize("command", ["estimate", "measure"])
def test_a_shape_error_inside_torch_names_the_users_line(user_module: Path, command: str, capsys) -> None:
    """The innermost frame is torch's (and bpmem's probes sit in between): the line named is
    the user's that called torch."""
    code, err = _run(capsys, [command, *_flags("wrong_width")])
    _one_line(code, err, "argument --model", "RuntimeError", f"{user_module.name}:{_line('linear')}")


def test_a_factory_that_raises(user_module: Path, capsys) -> None:
    code, err = _run(capsys, ["measure", *_flags("factory_raises")])
    _one_line(code, err, "argument --model", "raised RuntimeError: no weights here",
              f"{user_module.name}:{_line('factory')}", "factory_raises")


def test_a_data_function_that_raises(user_module: Path, capsys) -> None:
    code, err = _run(capsys, ["estimate", *_flags("linear", "data_raises")])
    _one_line(code, err, "argument --data", "raised ValueError: the data set is not mounted",
              f"{user_module.name}:{_line('data')}")


def test_wrong_factory_arguments_name_model_kwargs(user_module: Path, capsys) -> None:
    code, err = _run(capsys, ["estimate", *_flags("linear"), "--model-kwargs", '{"width": 3}'])
    _one_line(code, err, "argument --model", "TypeError", "unexpected keyword argument 'width'", "--model-kwargs")


def test_a_fit_whose_forward_raises(user_module: Path, capsys) -> None:
    code, err = _run(capsys, ["fit", "--memory", "1MiB", *_flags("key_error")])
    _one_line(code, err, "argument --model", "KeyError", f"{user_module.name}:{_line('forward')}")


@pytest.mark.parametrize("command", ["estimate", "measure"])
def test_batch_norm_on_one_row_micro_batches_says_so(user_module: Path, command: str, capsys) -> None:
    """PyTorch's message was cut at ": " as if it named a flag: "argument --Expected more than 1 ..."."""
    code, err = _run(capsys, [command, *_flags("batch_norm"), "--strategy", "microbatch", "--microbatches", "2",
                              "--batch-size", "2"])
    _one_line(code, err, "argument --model", "raised ValueError: Expected more than 1 value per channel",
              "BatchNorm1d", "BatchNorm cannot train on one row", "--microbatches")
    assert "argument --Expected" not in err


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_fit_of_a_batch_norm_model_says_why(user_module: Path, capsys) -> None:
    """fit keeps only the error's text; the CLI finds the exception again and says whose it is."""
    code, err = _run(capsys, ["fit", "--memory", "1MiB", *_flags("batch_norm")])
    _one_line(code, err, "argument --model", "ValueError", "BatchNorm cannot train on one row", "bpmem fit")


def test_a_target_the_loss_cannot_take(user_module: Path, capsys) -> None:
    code, err = _run(capsys, ["estimate", "--model", f"{MODULE}:linear", "--input", "float32[B,4]",
                              "--target", "int64[B,2]<3"])
    _one_line(code, err, "argument --loss", "cross_entropy raised", "output of shape (64, 3)",
              "target of shape (64, 2)", "allowed:")


def test_a_forward_that_returns_a_tuple_is_read_by_its_first_element(user_module: Path, capsys) -> None:
    import json

    figures = []
    for command in ("estimate", "measure"):
        capsys.readouterr()
        assert main([command, *_flags("returns_tuple"), "--json"]) == 0
        figures.append(json.loads(capsys.readouterr().out))
    assert figures[0]["peak_bytes"] == figures[1]["peak_bytes"] > 0


def test_a_forward_whose_output_has_no_logits(user_module: Path, capsys) -> None:
    code, err = _run(capsys, ["estimate", *_flags("returns_hidden")])
    _one_line(code, err, "argument --model", "returned dict without 'logits' (it has hidden)",
              "allowed: a tensor, a tuple whose first element is one, or a mapping with 'logits'")


def test_bpmem_debug_shows_the_users_traceback(user_module: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BPMEM_DEBUG", "1")
    with pytest.raises(KeyError, match="'x'"):
        main(["estimate", *_flags("key_error")])


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_bpmem_debug_shows_the_factorys_traceback_in_a_real_process(user_module: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(user_module.parent)]),
           "BPMEM_DEBUG": "1"}
    done = subprocess.run([sys.executable, "-m", "bpmem", "estimate", *_flags("factory_raises")], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and f'{user_module.name}", line {_line("factory")}' in done.stderr


def test_a_bpmem_bug_inside_the_users_forward_is_still_exit_3(user_module: Path, capsys) -> None:
    """The user's forward calls bpmem, and bpmem's own code raises: a user frame higher up
    does not make it the user's."""
    code = bpmem.cli.run(["estimate", *_flags("calls_bpmem")])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1 and "internal error: ValueError" in err, err


def test_a_bpmem_bug_under_a_user_model_is_still_exit_3(user_module: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys) -> None:
    """bpmem's measurement raises (a C function it calls refuses its arguments, so the
    innermost Python frame is bpmem's): a bug, whatever the model."""
    monkeypatch.setattr(bpmem.measurement.cell, "inference_step", {}.__getitem__)
    code = bpmem.cli.run(["measure", *_flags("linear")])
    err = capsys.readouterr().err
    assert code == 3 and "internal error: TypeError" in err and "a bug in bpmem" in err, err


def test_with_the_mlp_nothing_is_the_users(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(bpmem.measurement.cell, "inference_step", {}.__getitem__)
    assert bpmem.cli.run(["measure", "--batch-size", "2"]) == 3


def test_only_bpmems_own_field_errors_become_a_flag() -> None:
    """ "field: why" names a flag only where bpmem raised it about a field it knows."""
    module = ModuleType("elsewhere")
    exec(compile("def check():\n    raise ValueError('depth: mine, not bpmem')\n", "/somewhere/user.py", "exec"),
         module.__dict__)
    with pytest.raises(ValueError) as users:
        module.check()
    assert field_message(users.value) is None
    from bpmem.models.user_model import UserModel
    from bpmem.strategies.registry import make_step

    step = make_step(strategy="model-parallel", world_size=2)
    with pytest.raises(ValueError) as bpmems:
        step.strategy.check(UserModel("bpmem.models.gpt:make_gpt", data="bpmem.models.gpt:make_batch"), step)
    assert field_message(bpmems.value).startswith("argument --strategy: model-parallel")
    try:
        raise ValueError("Expected more than 1 value per channel when training, got input size [1, 8]")
    except ValueError as torch_like:
        assert field_message(torch_like) is None


# -- the sweep: an error in the user's code is a row, not the end of the sweep ---------------------

def _sweep(tmp_path: Path, factory: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, str]]:
    import csv

    config = tmp_path / "user.toml"
    config.write_text(f'name = "user"\nbatch_sizes = [2]\nmodes = ["train"]\nrepeats = 1\nwarmup = 0\n'
                      f'[model]\nfactory = "{MODULE}:{factory}"\ndata = "{MODULE}:data"\n')
    code = main(["run", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet", "--no-report"])
    assert code == 0, capsys.readouterr().err
    return list(csv.DictReader((tmp_path / "run" / "results.csv").open()))


def test_a_sweep_row_of_a_model_that_raises_a_value_error(user_module: Path, tmp_path: Path, capsys) -> None:
    rows = _sweep(tmp_path, "returns_hidden", capsys)
    assert [row["status"] for row in rows] == ["error"]
    assert "returned dict without 'logits'" in rows[0]["error"]


def test_a_sweep_row_of_a_model_that_raises_a_key_error(user_module: Path, tmp_path: Path, capsys) -> None:
    rows = _sweep(tmp_path, "key_error", capsys)
    assert [row["status"] for row in rows] == ["error"]
    assert "KeyError" in rows[0]["error"] and f"{user_module.name}:{_line('forward')}" in rows[0]["error"]


@pytest.mark.slow  # over a second on 2 cores: the full suite runs it
def test_the_console_script_finds_a_model_file_in_the_folder_it_runs_in(tmp_path: Path) -> None:
    """``cd myproject && bpmem measure --model mymodels:make``: the console script's import
    path holds only its bin folder, so the current directory must be added, as ``python -m``
    adds it. The forward raises KeyError('x'): exit 2, one line, the user's file and line."""
    (tmp_path / "mymodels.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.lin = nn.Linear(4, 2)\n\n    def forward(self, x):\n"
        "        return self.lin(x) * {'y': 1}['x']\n\n\ndef make():\n    return Net()\n\n\n"
        "def batch(batch_size, device):\n    return torch.randn(batch_size, 4), torch.randint(0, 2, (batch_size,))\n")
    script = Path(sys.executable).parent / "bpmem"
    if not script.exists():
        pytest.skip("bpmem is not installed as a console script here (PYTHONPATH=. runs)")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([str(script), "measure", "--model", "mymodels:make", "--data", "mymodels:batch",
                           "--batch-size", "4"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "KeyError: 'x'" in done.stderr and "mymodels.py:11 in Net.forward" in done.stderr, done.stderr
