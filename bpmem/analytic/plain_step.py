"""The plain step of the MLP, predicted: saved activations term by term, and the peak by replay.

The peak needs the order in which storages appear and die, so one step is replayed as a list
of allocations and frees in a ``Ledger``, mirroring what PyTorch 2.x's CPU kernels return to
the dispatcher, op by op, and when the autograd engine drops each buffer. The peak is the
largest running total. Each event names its op, so the replay is the predicted timeline
that the LiveTensorProbe's measured one is checked against (tests/test_estimate.py).

Shapes (B = batch, d = input_dim, h = hidden_dim, q = output_dim, s = bytes per element):
layer i maps in_i -> out_i; there are depth + 1 Linears; P_i = in_i * out_i * s is a weight.
"""

from __future__ import annotations

from typing import Any

from bpmem.analytic.ledger import Ledger
from bpmem.analytic.optimizer_step import replay_optimizer_step
from bpmem.analytic.rules import (
    input_row_bytes,
    label_row_bytes,
    layer_bytes,
    optimizer_state_bytes,
    parameter_tensors,
    saved_per_layer,
)
from bpmem.figures import Estimate, Term
from bpmem.spec import MLPSpec, StepSpec


def _replay_inference(spec: MLPSpec, batch_size: int, params_bytes: int) -> Ledger:
    """Forward under inference_mode: each activation dies when the next layer has run."""
    r, s, b = Ledger(), spec.itemsize, batch_size
    r.alloc("params", params_bytes, "params")
    r.alloc("X", b * spec.input_dim * s, "inputs")
    r.phase = "forward"
    dims = spec.layer_dims()
    for i, (_, fan_out) in enumerate(dims):
        r.alloc(f"z{i}", b * fan_out * s)
        if i > 0:
            r.free(f"h{i - 1}")  # nn.Sequential rebinds its loop variable
        if i < len(dims) - 1:
            r.alloc(f"h{i}", b * fan_out * s)
            r.free(f"z{i}")
    r.free(f"z{len(dims) - 1}")  # the logits, once the caller lets them go
    return r


def _replay_training(spec: MLPSpec, step: StepSpec, optimizer_bytes: int) -> Ledger:
    """One steady-state step: zero_grad, forward to J, backward, optimizer.step."""
    r, s, b = Ledger(), spec.itemsize, step.batch_size
    dims, weights = spec.layer_dims(), layer_bytes(spec)
    n_linear, q, gelu = len(dims), spec.output_dim, spec.activation == "gelu"
    for i, (w, bias) in enumerate(weights):
        r.alloc(f"W{i}", w, "params")
        if bias:
            r.alloc(f"b{i}", bias, "params")
    for i, (w, bias) in enumerate(weights):
        r.alloc(f"W{i}.grad", w, "grads")
        if bias:
            r.alloc(f"b{i}.grad", bias, "grads")
    if optimizer_bytes:
        r.alloc("optimizer state", optimizer_bytes, "optimizer")
    r.alloc("X", b * spec.input_dim * s, "inputs")
    r.alloc("y", b * label_row_bytes(spec), "inputs")

    r.phase = "zero_grad"  # set_to_none frees last step's gradients
    for i, (_, bias) in enumerate(weights):
        r.free(f"W{i}.grad", *([f"b{i}.grad"] if bias else []))

    r.phase = "forward"
    for i, (_, fan_out) in enumerate(dims):
        r.alloc(f"z{i}", b * fan_out * s)  # mm / addmm output
        if i < n_linear - 1:
            r.alloc(f"h{i}", b * fan_out * s)  # activation output, saved (by act or next mm)
            if not gelu:
                r.free(f"z{i}")  # only GELU keeps its input for backward
    o = f"z{n_linear - 1}"
    if spec.loss == "cross_entropy":
        r.alloc("log_softmax", b * q * s)
        r.alloc("L", s, record=False)  # one op, nll_loss_forward, returns both
        r.alloc("total_weight", s)  # its second output, saved
        r.free(o)  # the logits are not saved by cross-entropy
    else:
        # mse_loss keeps o itself; its 0-dim result is a view of the unreduced (B, q) buffer
        # that the CPU kernel reduces in place, so L holds B*q*s bytes until J is formed
        r.alloc("L", b * q * s)
    regularized = spec.l2 != 0  # l2 = 0 builds no term: J is L itself
    if regularized:
        _replay_regularizer_forward(r, weights, s)
    objective = "J" if regularized else "L"

    r.phase = "backward"
    r.alloc("dJ (ones_like)", s)  # held by torch.autograd.backward until it returns
    if regularized:
        _replay_regularizer_backward(r, weights, s)
    if spec.loss == "cross_entropy":
        r.alloc("nll_loss_backward", b * q * s)
        r.free("total_weight")
        r.alloc("do", b * q * s)  # _log_softmax_backward_data
        r.free("nll_loss_backward", "log_softmax")
    else:
        r.alloc("do", b * q * s)  # mse_loss_backward
        r.free(o)
    grad = "do"
    for i in reversed(range(n_linear)):
        fan_in, fan_out = dims[i]
        w, bias = weights[i]
        # MmBackward (no bias) makes the weight's gradient first, its mat2 being W^T, then the
        # input's; AddmmBackward makes the input's, then the weight's, then the bias's
        if i > 0 and bias:
            r.alloc(f"dh{i - 1}", b * fan_in * s)  # grad @ W: the input's gradient
        r.alloc(f"dW{i} (mm)", w)  # grad^T @ input
        if bias:
            r.alloc(f"db{i}", bias)  # sum_to over the batch; AccumulateGrad keeps it
        elif i > 0:
            r.alloc(f"dh{i - 1}", b * fan_in * s)
        r.free(grad)
        if gelu and i > 0:
            r.free(f"h{i - 1}")  # only this mm saved GELU's output
        if regularized:  # the two parts of dW meet at AccumulateGrad: summed in place into the l2 part
            r.free(f"dW{i} (mm)")
        if i > 0:
            r.alloc(f"dz{i - 1}", b * fan_in * s)  # activation backward
            r.free(f"dh{i - 1}", f"z{i - 1}" if gelu else f"h{i - 1}")
            grad = f"dz{i - 1}"
    r.free("dJ (ones_like)")

    r.phase = "optimizer_step"
    params = [(name, nbytes) for i, (w, bias) in enumerate(weights) for name, nbytes in ((f"W{i}", w), (f"b{i}", bias))
              if nbytes]
    replay_optimizer_step(r, step.optimizer, step.resolved_impl("cpu"), step.weight_decay, params)
    r.free(objective)  # the step returns J's value: the tensor dies as train_step ends
    return r


def _replay_regularizer_forward(r: Ledger, weights: list[tuple[int, int]], s: int) -> None:
    """s = l2/2 * sum ||W_j||^2, then J = L + s."""
    for j, (w, _) in enumerate(weights):
        r.alloc(f"W{j}^2", w)
        r.alloc(f"sum W{j}^2", s)
        r.free(f"W{j}^2")
    r.alloc("stack", len(weights) * s)
    r.alloc("sum stack", s)
    r.free("stack")
    r.alloc("s", s)  # times l2/2
    r.free("sum stack", *(f"sum W{j}^2" for j in range(len(weights))))
    r.alloc("J", s)
    r.free("L", "s")  # forward_objective's locals die in the order they were bound


def _replay_regularizer_backward(r: Ledger, weights: list[tuple[int, int]], s: int) -> None:
    """The regulariser's nodes were created last, so the engine runs them first: each pow
    backward makes W^1, 2*W^1 and grad*(2*W), and keeps the last, lambda*W, waiting at the
    weight's AccumulateGrad until the Linear's contribution arrives."""
    r.alloc("ds", s)  # MulBackward: dJ * l2/2
    for j in reversed(range(len(weights))):
        w = weights[j][0]
        r.alloc(f"pow(W{j},1)", w)
        r.alloc(f"2*W{j}", w)
        r.alloc(f"dW{j} (l2 part)", w)
        r.free(f"pow(W{j},1)", f"2*W{j}")
    r.free("ds")


def _estimate_hvp(spec: MLPSpec, step: StepSpec, params_bytes: int, terms: list[Term], saved: int,
                  per_layer: list[dict[str, Any]], inference: Ledger) -> Estimate:
    """H v: the forward's saved tensors, plus what the create_graph backward saves.

    Differentiating the backward needs the upstream gradients wherever they multiply
    something that requires grad (``derivatives.yaml`` again, applied to backward ops):
    ``mm`` in the backward of Linear i >= 1 keeps dJ/dz_i (B*h*s; dJ/do for the output
    Linear, B*q*s); ``tanh_backward``, ``sigmoid_backward`` and ``gelu_backward`` keep their
    incoming gradient (B*h*s per layer), ``threshold_backward`` (ReLU) does not, its
    derivative in the gradient being zero; cross-entropy keeps ``nll_loss_backward``'s output
    (B*q*s), MSE a 0-dim scalar; the regulariser's backward keeps one 0-dim gradient; and
    (g . v) keeps v (params-sized). The peak is estimated, not replayed: all of that plus
    params, batch, v, and two params-sized sets (first-order gradients, then H v).
    """
    s, b, h, q, depth = spec.itemsize, step.batch_size, spec.hidden_dim, spec.output_dim, spec.depth
    upstream = (depth - 1) * b * h * s + b * q * s
    smooth = depth * b * h * s if spec.activation != "relu" else 0
    loss_grad = b * q * s if spec.loss == "cross_entropy" else s
    reg_grad = s if spec.l2 != 0 else 0  # the regulariser's 0-dim gradient, when there is one
    hvp_terms = [
        Term("hvp: upstream gradients kept", upstream, "(depth-1)*B*h*s + B*q*s", "mm in backward saves dJ/dz"),
        Term("hvp: activation-backward gradients", smooth, "depth*B*h*s (not ReLU)",
             "tanh/sigmoid/gelu_backward save their grad_output"),
        Term("hvp: loss and regulariser gradients", loss_grad + reg_grad, "CE: B*q*s + s; MSE: 2s (no s: l2 = 0)",
             "nll_loss_backward output; 0-dim grads"),
        Term("hvp: the vector v", params_bytes, "= params", "(g * v).sum() saves v"),
    ]
    retained = saved + sum(t.bytes for t in hvp_terms)
    inputs = b * (input_row_bytes(spec) + label_row_bytes(spec))
    peak = 2 * params_bytes + inputs + retained + 2 * params_bytes
    return Estimate(
        params_bytes=params_bytes, grads_bytes=params_bytes, optimizer_bytes=0, saved_activation_bytes=retained,
        peak_bytes=peak, inference_peak_bytes=inference.peak, per_layer=[], terms=terms + hvp_terms,
        peak_phase="double_backward", peak_op="", peak_by_category={}, timeline=[],
        inference_timeline=inference.events, recompute_flops=0, peak_is_exact=False,
    )


def plain_estimate(spec: MLPSpec, step: StepSpec) -> Estimate:
    """Every figure of the plain step (train, inference or hvp), whatever ``step.strategy``."""
    if step.amp != "none":
        raise ValueError(f"amp: the arithmetic replays full precision only, not {step.amp} autocast; allowed: "
                         "none (bpmem estimate --amp runs the step on fake tensors instead)")
    s, b = spec.itemsize, step.batch_size
    per_layer_bytes = layer_bytes(spec)
    params_bytes = sum(w + bias for w, bias in per_layer_bytes)
    per_layer = saved_per_layer(spec, b)
    inference = _replay_inference(spec, b, params_bytes)
    train = step.mode in ("train", "hvp")
    optimizer_bytes = optimizer_state_bytes(step.optimizer, params_bytes, parameter_tensors(spec)) if train else 0
    hidden_saved = sum(row["saved_bytes"] for row in per_layer[1:-2])
    loss_saved = per_layer[-2]["saved_bytes"]
    terms = [
        Term("params", params_bytes, "sum_i (in_i*out_i + out_i*bias) * s",
             "nn.Linear holds weight (out, in) and bias (out,)"),
        Term("grads", params_bytes if train else 0, "= params", "one .grad per parameter after backward"),
        Term("optimizer", optimizer_bytes,
             {"sgd": "0", "sgd-momentum": "params", "adam": "2*params + n_params*4 (step)",
              "adamw": "2*params + n_params*4 (step)"}[step.optimizer],
             "torch.optim state: momentum_buffer; exp_avg, exp_avg_sq and a 0-dim step"),
        Term("saved: input batch X", b * spec.input_dim * s if train else 0, "B*d*s",
             "mm/addmm save mat1 when the weight needs a gradient"),
        Term("saved: hidden activations", hidden_saved if train else 0,
             "depth*B*h*s (2x for GELU)", "relu/tanh/sigmoid save their output; gelu its input"),
        Term("saved: loss internals", loss_saved if train else 0,
             "CE: B*q*s + 8B + s; MSE: 2*B*q*s",
             "log_softmax output, int64 labels, total_weight; or mse's input and target"),
    ]
    saved = sum(t.bytes for t in terms if t.name.startswith("saved"))
    if step.mode == "hvp":
        return _estimate_hvp(spec, step, params_bytes, terms, saved, per_layer, inference)
    replay = _replay_training(spec, step, optimizer_bytes) if train else inference
    return Estimate(
        params_bytes=params_bytes, grads_bytes=params_bytes if train else 0, optimizer_bytes=optimizer_bytes,
        saved_activation_bytes=saved, peak_bytes=replay.peak, inference_peak_bytes=inference.peak,
        per_layer=per_layer if train else [], terms=terms, peak_phase=replay.peak_phase, peak_op=replay.peak_op,
        peak_by_category=replay.peak_by_category, timeline=replay.events, inference_timeline=inference.events,
    )
