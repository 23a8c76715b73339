"""Write a sweep config (a dict, as ``tomllib`` reads it) back as TOML text, so that tests
change configs as data, never by editing their text."""

from __future__ import annotations

import json
from typing import Any


def value(item: Any) -> str:
    """One TOML value: strings and numbers as JSON writes them, lists, inline tables."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, dict):
        return "{ " + ", ".join(f"{k} = {value(v)}" for k, v in item.items()) + " }"
    if isinstance(item, list):
        return "[" + ", ".join(value(v) for v in item) + "]"
    return json.dumps(item)


def dumps(config: dict[str, Any]) -> str:
    """Top-level keys, then the ``[model]`` table, or one ``[[model]]`` table per model
    where ``model`` is a list of them."""
    top = [f"{k} = {value(v)}" for k, v in config.items() if k != "model"]
    models = config.get("model", {})
    if isinstance(models, list):
        tables = [line for grid in models for line in ["[[model]]", *(f"{k} = {value(v)}" for k, v in grid.items())]]
    else:
        tables = ["[model]", *(f"{k} = {value(v)}" for k, v in models.items())]
    return "\n".join([*top, *tables]) + "\n"


def run_sweep(folder: Any, name: str, text: str) -> Any:
    """Write ``text`` as ``folder/name.toml``, run it with ``bpmem run --quiet`` into
    ``folder/run`` (asserting exit 0) and return that run folder."""
    from bpmem.cli import main

    config = folder / f"{name}.toml"
    config.write_text(text)
    out = folder / "run"
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    return out
