"""``--hf MODEL_TYPE``: a Hugging Face model built from its config (no download), with the
batch its config sizes; in a sweep, ``[model] hf = ...`` with ``seq_len`` as an axis. The
estimate equals the measurement; bad input is one line, exit 2."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from bpmem.cli import main  # noqa: E402 - after the skip
from bpmem.sweep.config import ConfigError, load_config, parse_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 500}
FIGURES = ("params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes", "peak_bytes",
           "inference_peak_bytes")


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # a real and a fake step of each: several seconds
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_estimate_equals_measure(model_type: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the Llama's config as JSON text, the GPT-2's as a local config.json
    config = json.dumps(LLAMA)
    if model_type == "gpt2":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64,
                                                          "n_head": 4, "vocab_size": 500, "n_positions": 64}))
        config = str(tmp_path / "config.json")
    flags = ["--hf", model_type, "--hf-config", config, "--seq-len", "24", "--optimizer", "adamw",
             "--batch-size", "3"]
    estimated, measured = _json(capsys, ["estimate", *flags]), _json(capsys, ["measure", *flags])
    assert {k: estimated[k] for k in FIGURES} == {k: measured[k] for k in FIGURES}
    assert estimated["config"]["model"] == "bpmem.models.hf:build"


@pytest.mark.parametrize("argv,flag,words", [
    (["--hf", "no-such-type"], "--hf", "not a transformers model type"),
    (["--hf-config", "{}"], "--hf-config", "only with --hf"),
    (["--hf", "llama", "--data", "tests.fixtures.hf_models:causal_batch"], "--data", "builds the model"),
    (["--hf", "llama", "--hf-head", "speech"], "--hf-head", "allowed: causal-lm"),
    (["--hf", "llama", "--hf-config", "{not json"], "--hf-config", "neither JSON nor a config.json"),
    (["--hf", "llama", "--depth", "3"], "--depth", "shapes the MLP only"),
])
def test_bad_input_is_one_line(argv: list[str], flag: str, words: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}" in err and words in err and "Traceback" not in err


def test_without_transformers_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert main(["estimate", "--hf", "llama"]) == 2
    assert "argument --hf: needs the transformers package" in capsys.readouterr().err


def test_the_shipped_config_sweeps_seq_len_as_an_axis() -> None:
    cells = load_config(ROOT / "benchmarks" / "configs" / "hf.toml").cells()
    ids = [c.cell_id for c in cells]
    assert len(ids) == len(set(ids)) == 48
    assert sum("hf:llama" in i and "-seq_len=256-" in i for i in ids) == 12
    shapes = {str(s) for c in cells for s in c.spec.inputs}
    assert "input_ids=int64[B,64]<2000" in shapes and "labels=int64[B,256]<2000" in shapes


@pytest.mark.parametrize("table,key", [("hf = 3", "model.hf"), ('hf = "no-such-type"', "model.hf"),
                                       ('hf = "llama"\nseq_len = 0', "model.seq_len"),
                                       ('seq_len = 64', "model.seq_len"),
                                       ('hf = "llama"\nhf_head = "speech"', "model.hf_head"),
                                       ('hf = "llama"\ndata = "x:y"', "model.data")])
def test_bad_hf_keys_in_a_config(table: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        parse_config(tomllib.loads(f"[model]\n{table}\n"))
