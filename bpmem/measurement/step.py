"""One step of the plain strategy: the unit that every probe watches.

A training step, the one whose ``peak_bytes`` results.csv records, is:
``zero_grad(set_to_none=True)``, forward to J = L + s, ``J.backward()``, ``optimizer.step()``.
An inference step is one forward as people serve a model: ``model.eval()`` (Dropout off,
BatchNorm on its running statistics, PyTorch's eval-only fast paths such as
``TransformerEncoder``'s nested tensors), under ``torch.inference_mode()``; each module's own
training flag is put back afterwards.

The step takes two optional callbacks so probes can label what happens without the step
knowing about probes: ``phase(name)`` wraps each stage (the LiveTensorProbe labels new
storages with it) and ``scope(name)`` wraps the loss and the regulariser (the
SavedTensorProbe attributes what they save to that name rather than to "outside").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
from torch import nn

from bpmem.measurement.precision import Precision, precision_for, precision_of
from bpmem.models.batch import batch_tensors, first_device, refill
from bpmem.models.mlp import add_regularizer, as_workload
from bpmem.models.workload import Workload
from bpmem.spec import MLPSpec, StepSpec, StrategyRuntime
from bpmem.torch_private import is_fake

ModelSpec = MLPSpec | Workload  # an MLPSpec stands for the seed's MLP (``bpmem.models.mlp.MLP``)

Labeller = Callable[[str], ContextManager[None]]


@contextlib.contextmanager
def _unlabelled(name: str) -> Iterator[None]:
    yield


def make_optimizer(step: StepSpec, model: nn.Module) -> torch.optim.Optimizer:
    """SGD, SGD with momentum, Adam or AdamW, with ``step.weight_decay`` and the
    implementation ``step.optimizer_impl`` (``default``: PyTorch's own choice, the for-loop
    on CPU and foreach on CUDA; ``StepSpec.resolved_impl`` names it)."""
    params = list(model.parameters())
    impl = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    options = {"lr": step.lr, "weight_decay": step.weight_decay, **impl.get(step.optimizer_impl, {})}
    if step.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, **options)
    elif step.optimizer == "sgd-momentum":
        optimizer = torch.optim.SGD(params, momentum=step.momentum, **options)
    else:
        optimizer = (torch.optim.AdamW if step.optimizer == "adamw" else torch.optim.Adam)(params, **options)
    # --amp rides with the optimizer, so every step function handed it runs the same step
    optimizer.bpmem_precision = precision_for(step.amp, params[0].device if params else "cpu")  # type: ignore[attr-defined]
    return optimizer


def forward_objective(spec: ModelSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      scope: Labeller = _unlabelled, strategy: StrategyRuntime | None = None) -> torch.Tensor:
    """J = L + s. Only J survives the call: L, s and the logits are kept by the graph alone."""
    workload = as_workload(spec)
    output = strategy.forward(model, x) if strategy is not None else workload.forward(model, x)
    with scope("loss"):
        loss = workload.data_loss(output, y)
    del output
    with scope("regularizer"):
        reg = workload.regularizer(model)
    return loss if reg is None else loss + reg  # L dies before s as the frame clears


def train_step(spec: ModelSpec, model: nn.Module, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, phase: Labeller = _unlabelled,
               scope: Labeller = _unlabelled, strategy: StrategyRuntime | None = None,
               observe: Callable[[torch.Tensor], None] | None = None) -> float:
    """One training step; returns J (computed before the update) as a Python float (NaN on
    fake tensors, which have no value). ``observe`` sees each J before its backward.

    With the ``microbatch`` strategy the batch is cut into k micro-batches
    (``torch.chunk``: views, no copies) and the gradients accumulate: micro-batch i adds
    (B_i / B) * L_i, and the first also s, so the summed gradient is the full batch's.
    """
    microbatches = getattr(strategy, "microbatches", 0)
    if microbatches:
        return _accumulating_step(spec, model, optimizer, x, y, microbatches, phase, scope, observe)
    precision = precision_of(optimizer)
    with phase("zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    with phase("forward"), precision.region(_device_of(x)):
        objective = forward_objective(spec, model, x, y, scope, strategy)
    if observe is not None:
        observe(objective)
    with phase("backward"):
        precision.backward(objective)
    with phase("optimizer_step"):
        precision.step(optimizer)
    return _value(objective)


def _device_of(x: Any) -> torch.device:
    """The device of a batch's inputs (several: the first's)."""
    return first_device(x)


def _value(objective: torch.Tensor) -> float:
    return float("nan") if is_fake(objective) else objective.item()


def micro_batches(x: Any, y: Any, microbatches: int) -> list[tuple[Any, Any, float]]:
    """(inputs, target, share of the rows) of each micro-batch: every tensor of the batch cut
    along dimension 0 (``torch.chunk``: views), the structure kept (a tuple, a dict). A tensor
    whose dimension 0 is not the batch's (a flat index tensor, a shared table) cannot be cut
    so: a one-line refusal says which."""
    tensors = batch_tensors(x, y)
    leading = [t.shape[0] for t in tensors if t.dim()]
    rows = max(sorted(set(leading)), key=leading.count) if leading else 0  # most tensors hold the batch in dimension 0
    odd = next((t for t in tensors if t.dim() == 0 or t.shape[0] != rows), None)
    if odd is not None or rows == 0:
        shape = tuple(odd.shape) if odd is not None else ()
        raise ValueError(f"strategy: microbatch cuts every input and the target along dimension 0, and one of shape "
                         f"{shape} does not hold the batch's {rows} rows there; allowed: inputs whose dimension 0 "
                         "is the batch, or another strategy")
    parts = [t.chunk(microbatches) for t in tensors]
    out = []
    for index in range(len(parts[0])):
        pieces = iter([part[index] for part in parts])
        out.append((refill(x, pieces), refill(y, pieces), parts[0][index].shape[0] / rows))
    return out


def _accumulating_step(spec: ModelSpec, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                       y: torch.Tensor, microbatches: int, phase: Labeller, scope: Labeller,
                       observe: Callable[[torch.Tensor], None] | None) -> float:
    workload = as_workload(spec)
    precision = precision_of(optimizer)
    with phase("zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for index, (x_part, y_part, share) in enumerate(micro_batches(x, y, microbatches)):
        with phase("forward"), precision.region(first_device(x)):
            output = workload.forward(model, x_part)
            with scope("loss"):
                objective = workload.data_loss(output, y_part) * share
            del output
            if index == 0:
                with scope("regularizer"):
                    objective = add_regularizer(objective, workload.regularizer(model))
        if observe is not None:
            observe(objective)
        with phase("backward"):
            precision.backward(objective)
        total += _value(objective)
        del objective
    with phase("optimizer_step"):
        precision.step(optimizer)
    return total


def hvp_step(spec: ModelSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, vector: list[torch.Tensor],
             phase: Labeller = _unlabelled, scope: Labeller = _unlabelled) -> None:
    """H v by double backward (the seed's exercise 4).

    The first backward runs with ``create_graph=True``: it records itself as a graph, whose
    nodes save what differentiating the backward needs (the upstream gradients dJ/do, dJ/dz_i
    wherever a product or a smooth activation uses them), and it keeps every tensor the
    forward saved alive until the second backward is done.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with phase("forward"):
        objective = forward_objective(spec, model, x, y, scope)
    with phase("backward"):
        grads = torch.autograd.grad(objective, params, create_graph=True)
    with phase("double_backward"):
        dot = torch.stack([(g * v).sum() for g, v in zip(grads, vector, strict=True)]).sum()
        del grads
        torch.autograd.grad(dot, params)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then every module's own training flag back (a model
    may mix modes: a frozen BatchNorm in eval inside a training model)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def inference_step(model: nn.Module, x: torch.Tensor, phase: Labeller = _unlabelled,
                   workload: Workload | None = None, precision: Precision | None = None) -> torch.Tensor:
    """One forward as a served model runs: in eval mode, with autograd off. Nothing is saved,
    each activation dies at the next layer, Dropout makes no mask and BatchNorm no batch
    statistics (nor does it move its running ones)."""
    with (evaluating(model), phase("forward"), torch.inference_mode(),
          (precision or Precision()).region(_device_of(x))):
        return workload.forward(model, x) if workload is not None else model(x)
