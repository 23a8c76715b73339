"""A batch's inputs as models really take them: a tensor, a tuple (passed positionally) or a
dict (passed by keyword, as Hugging Face models take ``input_ids``, ``attention_mask`` and
``labels``); and a model's output as models really give it: a tensor, a tuple or list (its
first element), or a mapping such as a transformers ``ModelOutput`` (its ``loss`` or its
``logits``).

Every place that walks a batch (the probes' resident inputs, a rank's rows, the meta batch)
goes through here, so a new form of input is taught once. Nothing here imports torch at
module level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any


def input_tensors(inputs: Any) -> list[Any]:
    """The tensors of ``inputs``, in order (a dict's in its keys' order); None is skipped."""
    if inputs is None:
        return []
    if isinstance(inputs, Mapping):
        return [t for value in inputs.values() for t in input_tensors(value)]
    if isinstance(inputs, (tuple, list)):
        return [t for value in inputs for t in input_tensors(value)]
    return [inputs] if hasattr(inputs, "untyped_storage") else []


def batch_tensors(inputs: Any, target: Any) -> list[Any]:
    """Every tensor of a batch: the inputs', then the target, if any."""
    return [*input_tensors(inputs), *input_tensors(target)]


def map_tensors(inputs: Any, change: Callable[[Any], Any]) -> Any:
    """``inputs`` with each tensor replaced by ``change(tensor)``, the structure kept."""
    if isinstance(inputs, Mapping):
        return {key: map_tensors(value, change) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(value, change) for value in inputs)
    return change(inputs) if hasattr(inputs, "untyped_storage") else inputs


def call_model(model: Any, inputs: Any) -> Any:
    """``model(inputs)``: a tuple positionally, a dict by keyword, anything else as one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def first_device(inputs: Any) -> Any:
    """The device of the batch's first input tensor."""
    tensors = input_tensors(inputs)
    if not tensors:
        raise ValueError("the batch has no input tensor")
    return tensors[0].device


def output_tensor(output: Any, want: str) -> tuple[Any, str]:
    """From a model's output, the tensor a loss needs: ``want`` is "loss" (with ``--loss
    none``) or "logits". Returns (tensor or None, how it was found) where the tensor is None
    when the output has nothing of the kind; the second item then says what it has."""
    if hasattr(output, "untyped_storage"):
        return output, "a tensor"
    if isinstance(output, Mapping):  # a dict, or a transformers ModelOutput (an OrderedDict)
        value = output.get(want)
        if value is None:
            keys = ", ".join(k for k, v in output.items() if v is not None) or "nothing"
            return None, f"{type(output).__name__} without {want!r} (it has {keys})"
        return value, f"its {want!r}"
    if isinstance(output, (tuple, list)) and output:
        first, how = output_tensor(output[0], want)
        return first, "its first element" if first is not None else f"a {type(output).__name__} of {how}"
    return None, type(output).__name__


def refill(structure: Any, tensors: Iterator[Any]) -> Any:
    """``structure`` with its tensors taken in order from ``tensors`` (``input_tensors``' order)."""
    return map_tensors(structure, lambda _: next(tensors))
