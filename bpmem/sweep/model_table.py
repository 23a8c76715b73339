"""A ``[model]`` table's own-model keys: your factory and data, or a Hugging Face model type.

``user_model_value`` checks one value where the config is read (so the message names its key);
``user_model`` builds the workload of one cell from the checked values. ``kwargs``,
``hf_config`` and a table of named inputs are held as JSON text, which keeps them hashable
grid values.
"""

from __future__ import annotations

import json
from typing import Any


def user_model(fields: dict[str, Any]) -> Any:
    """A ``UserModel`` from a [model] table's values (``kwargs`` held as JSON text)."""
    from bpmem.models.user_model import TensorShape, UserModel

    if "hf" in fields:
        from bpmem.models.hf import hf_model

        return hf_model(fields["hf"], json.loads(fields.get("hf_config", "{}")), fields.get("hf_head"),
                        fields.get("seq_len"), fields.get("blocks"))
    given = fields.get("input")
    named = json.loads(given) if isinstance(given, str) and given.startswith("{") else None
    inputs = () if given is None else \
        tuple(TensorShape.parse(f"{name}={shape}", "model.input") for name, shape in named.items()) if named else \
        (TensorShape.parse(given, "model.input"),)
    target = TensorShape.parse(fields["target"], "model.target") if fields.get("target") else None
    return UserModel(fields["factory"], fields.get("kwargs", "{}"), fields.get("data"), inputs, target,
                     fields.get("loss", "cross_entropy"), fields.get("blocks"))


def user_model_value(key: str, item: Any) -> Any:
    """Check one value of a user-model key, naming it; ``kwargs`` comes back as JSON text."""
    from bpmem.models.user_model import LOSSES, TensorShape, UserModelError, load_callable

    # a bad value raises UserModelError naming its dotted key: the config's reader turns it into a ConfigError
    if key in ("factory", "data"):
        load_callable(item, f"model.{key}")
    elif key == "input" and isinstance(item, dict):  # named inputs: input = { input_ids = "int64[B,128]<V" }
        for name, shape in item.items():
            TensorShape.parse(f"{name}={shape}", "model.input")
        return json.dumps(item)
    elif key in ("input", "target"):
        TensorShape.parse(item, f"model.{key}")
    elif key == "hf":
        from bpmem.models.hf import make_config

        if not isinstance(item, str):
            raise UserModelError("model.hf", f"{item!r} is not allowed; allowed: a model type, e.g. \"llama\"")
        try:
            make_config(item, {})
        except UserModelError as error:  # named by the config's key, not by the flag
            raise UserModelError("model.hf", str(error).split(": ", 1)[1]) from None
    elif key == "hf_config":
        if not isinstance(item, dict):
            raise UserModelError("model.hf_config", f"{item!r} is not allowed; allowed: a table of config "
                                                    "overrides, e.g. { num_hidden_layers = 4 }")
        return json.dumps(item, sort_keys=True)
    elif key == "hf_head":
        from bpmem.models.hf import HEADS

        if item not in HEADS:
            raise UserModelError("model.hf_head", f"{item!r} is not allowed; allowed: {', '.join(HEADS)}")
    elif key == "seq_len" and (isinstance(item, bool) or not isinstance(item, int) or item < 1):
        raise UserModelError("model.seq_len", f"{item!r} is not allowed; allowed: an integer >= 1")
    elif key == "loss" and item not in LOSSES:
        raise UserModelError("model.loss", f"{item!r} is not allowed; allowed: {', '.join(LOSSES)}")
    elif key == "kwargs":
        if not isinstance(item, dict):
            raise UserModelError("model.kwargs", f"{item!r} is not allowed; allowed: a table, e.g. "
                                                 "kwargs = { layers = 4 }, or a list of tables (an axis)")
        return json.dumps(item, sort_keys=True)
    elif key == "blocks" and not isinstance(item, str):
        raise UserModelError("model.blocks", f"{item!r} is not allowed; allowed: a dotted module path")
    return item
