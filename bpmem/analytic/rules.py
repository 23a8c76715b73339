"""Every byte rule of the MLP's step, in one place: what a parameter, a batch row, the loss
and the optimizer state cost, and what each unit of the chain saves for backward.

The rules follow PyTorch's ``tools/autograd/derivatives.yaml`` (what each op saves) and
``torch.optim`` (what each optimizer keeps). Shapes: B rows, d = input_dim, h = hidden_dim,
q = output_dim, s = bytes per element of the model dtype; layer i maps in_i -> out_i.
Nothing here imports torch.
"""

from __future__ import annotations

import sys
from typing import Any

from bpmem.analytic.planner import ChainCosts
from bpmem.spec import MLPSpec

INT64_BYTES = 8  # class labels for cross_entropy are int64
ACTIVATION_MODULE_NAMES: dict[str, str] = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid", "gelu": "GELU"}


def layer_bytes(spec: MLPSpec) -> list[tuple[int, int]]:
    """(weight bytes, bias bytes) of each Linear, input side first."""
    s = spec.itemsize
    return [(fan_in * fan_out * s, fan_out * s if spec.bias else 0) for fan_in, fan_out in spec.layer_dims()]


def parameter_tensors(spec: MLPSpec) -> int:
    """How many parameter tensors the model has: a weight per Linear, and a bias with ``bias``."""
    return (spec.depth + 1) * (2 if spec.bias else 1)


def adam_step_bytes() -> int:
    """Adam keeps ``step`` as a 0-dim tensor of torch's default dtype (float32 unless the
    default is float64) when neither ``capturable`` nor ``fused`` is set."""
    torch = sys.modules.get("torch")  # never import it just to ask: the default is float32
    return 8 if torch is not None and torch.get_default_dtype() == torch.float64 else 4


def optimizer_state_bytes(optimizer: str, state_bytes: int, tensors: int) -> int:
    """Per-parameter state of ``tensors`` parameters holding ``state_bytes`` in all: SGD none,
    momentum one buffer each, Adam and AdamW two (exp_avg, exp_avg_sq) and a 0-dim step each."""
    adam = 2 * state_bytes + tensors * adam_step_bytes()
    return {"sgd": 0, "sgd-momentum": state_bytes, "adam": adam, "adamw": adam}[optimizer]


def input_row_bytes(spec: MLPSpec) -> int:
    """One row of X."""
    return spec.input_dim * spec.itemsize


def label_row_bytes(spec: MLPSpec) -> int:
    """One row of y: an int64 class label, or q targets in the model dtype for MSE."""
    return INT64_BYTES if spec.loss == "cross_entropy" else spec.output_dim * spec.itemsize


def loss_saved_bytes(spec: MLPSpec, rows: int) -> int:
    """What the loss saves for ``rows`` rows: log_softmax's output, the labels and nll_loss's
    0-dim total_weight; or, for MSE, its input o and its target y."""
    s, q = spec.itemsize, spec.output_dim
    if spec.loss == "cross_entropy":
        return rows * q * s + rows * label_row_bytes(spec) + s
    return rows * q * s + rows * label_row_bytes(spec)


def chain_costs(spec: MLPSpec, rows: int) -> ChainCosts:
    """Bytes and FLOPs of each unit (Linear + activation) at ``rows`` rows: its input
    (boundary), GELU's input z (internal: the only activation that saves its input), and the
    matmul FLOPs 2*B*in*out of its forward."""
    s, dims = spec.itemsize, spec.layer_dims()
    gelu = spec.activation == "gelu"
    return ChainCosts(
        boundary_bytes=tuple(rows * fan_in * s for fan_in, _ in dims),
        internal_bytes=tuple(rows * fan_out * s if gelu and j < len(dims) - 1 else 0
                             for j, (_, fan_out) in enumerate(dims)),
        forward_flops=tuple(2 * rows * fan_in * fan_out for fan_in, fan_out in dims),
    )


def saved_per_layer(spec: MLPSpec, rows: int) -> list[dict[str, Any]]:
    """Saved bytes per module, attributed as SavedTensorProbe does (the first saver owns it).

    ReLU, Tanh and Sigmoid save h_i, their output, which is also the next mm's mat1; GELU
    saves z_i, its input, and the next Linear saves h_i separately. The regulariser's pow
    saves W, a parameter, which is not an activation."""
    s, act = spec.itemsize, ACTIVATION_MODULE_NAMES[spec.activation]
    out: list[dict[str, Any]] = []
    for i, (fan_in, _) in enumerate(spec.layer_dims()):
        if i > 0:
            out.append({"name": f"{2 * i - 1}.{act}", "saved_bytes": rows * fan_in * s})
        own = rows * fan_in * s if (i == 0 or spec.activation == "gelu") else 0
        out.append({"name": f"{2 * i}.Linear", "saved_bytes": own})
    out.append({"name": "loss", "saved_bytes": loss_saved_bytes(spec, rows)})
    out.append({"name": "regularizer", "saved_bytes": 0})
    return out


def plain_retained_bytes(spec: MLPSpec, rows: int) -> int:
    """What the plain step retains for backward at ``rows`` rows: every boundary and internal
    of the chain, and the loss's tensors."""
    costs = chain_costs(spec, rows)
    return sum(costs.boundary_bytes) + sum(costs.internal_bytes) + loss_saved_bytes(spec, rows)


def units_state_bytes(spec: MLPSpec, optimizer: str, ranges: list[tuple[int, int]]) -> dict[str, int]:
    """Parameters, gradients and optimizer state of the whole units in ``ranges`` ([start,
    end) unit indices): what a pipeline rank or a model-parallel device holds."""
    per_layer = layer_bytes(spec)
    params = sum(w + b for start, end in ranges for w, b in per_layer[start:end])
    tensors = sum((end - start) * (2 if spec.bias else 1) for start, end in ranges)
    return {"params_bytes": params, "grads_bytes": params,
            "optimizer_bytes": optimizer_state_bytes(optimizer, params, tensors)}
