"""From spec to tensors: the model, a batch, and the seed's objective J = L + s; and ``MLP``,
the seed's network as a ``bpmem.models.workload.Workload``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bpmem.models.batch import batch_tensors, refill
from bpmem.models.workload import Workload
from bpmem.spec import MLPSpec

_ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def build(spec: MLPSpec, device: str | torch.device = "cpu", seed: int | None = 0) -> nn.Sequential:
    """Linear, act, Linear, act, ..., Linear: ``2 * depth + 1`` modules, Linear at even indices.

    Weights use PyTorch's default init under ``seed`` so that two builds are identical.
    """
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(spec.layer_dims()):
        if index > 0:
            layers.append(_ACTIVATION_MODULES[spec.activation]())
        # made in place, never moved with .to(): a fake-tensor build cannot swap parameters
        layers.append(nn.Linear(fan_in, fan_out, bias=spec.bias, device=device, dtype=spec.torch_dtype))
    return nn.Sequential(*layers)


def weight_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The W's of the regulariser: every Linear's weight, never its bias (as in the seed)."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def make_batch(
    spec: MLPSpec, batch_size: int, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (X, y): X is (B, input_dim); y is (B,) int64 labels or (B, output_dim) targets."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, spec.input_dim, generator=generator).to(device, spec.torch_dtype)
    if spec.loss == "cross_entropy":
        y = torch.randint(0, spec.output_dim, (batch_size,), generator=generator).to(device)
    else:
        y = torch.randn(batch_size, spec.output_dim, generator=generator).to(device, spec.torch_dtype)
    return x, y


def data_loss(spec: MLPSpec, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L = l(o, y), averaged over the batch."""
    if spec.loss == "cross_entropy":
        return nn.functional.cross_entropy(output, target)
    return nn.functional.mse_loss(output, target)


def regularizer(spec: MLPSpec, model: nn.Module) -> torch.Tensor | None:
    """s = lambda/2 * sum ||W||_F^2 over the weight matrices only; None for lambda = 0, which
    builds no term at all (a zero-weighted one would still allocate its backward's buffers).

    Each square sum is taken where its weight lives and then moved next to the last weight
    (the output layer's device, where the loss is), so s works when the layers are spread
    over devices (``model-parallel``); on one device ``.to`` is a no-op and copies nothing.
    A sharded weight's square sum is gathered whole first (``_whole``)."""
    if spec.l2 == 0:
        return None
    weights = weight_matrices(model)
    squares = [_whole(w.pow(2).sum()).to(weights[-1].device) for w in weights]
    return torch.stack(squares).sum() * (spec.l2 / 2)


def _whole(square: torch.Tensor) -> torch.Tensor:
    """A sharded weight's square sum (a Partial or Replicate DTensor, under FSDP or tensor
    parallelism) made whole with ``full_tensor()``, an all-reduce, so that s is a plain tensor
    on every rank; a plain tensor as it is."""
    full_tensor = getattr(square, "full_tensor", None)
    return full_tensor() if full_tensor is not None else square


def objective(spec: MLPSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """J = L + s, the seed's objective (L alone for lambda = 0)."""
    return add_regularizer(data_loss(spec, model(x), y), regularizer(spec, model))


def units(model: nn.Module) -> list[list[nn.Module]]:
    """[[Linear_0, act_0], [Linear_1, act_1], ..., [Linear_depth]]: the chain's blocks."""
    modules = list(model)
    return [modules[i:i + 2] for i in range(0, len(modules), 2)]


@dataclass(frozen=True)
class MLP:
    """The seed's network (``MLPSpec``) behind the model seam."""

    spec: MLPSpec
    name: str = "mlp"

    def build(self, device: str | torch.device = "cpu", seed: int | None = 0) -> nn.Sequential:
        return build(self.spec, device, seed)

    def make_batch(self, batch_size: int, device: str | torch.device = "cpu",
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return make_batch(self.spec, batch_size, device, seed)

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def data_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return data_loss(self.spec, output, target)

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        return regularizer(self.spec, model)

    def blocks(self, model: nn.Module) -> list[list[nn.Module]]:
        return units(model)

    @property
    def analytic(self) -> MLPSpec:
        return self.spec


def as_workload(model: MLPSpec | Workload) -> Workload:
    """A workload: an ``MLPSpec`` becomes the seed's ``MLP``; a workload stays itself."""
    return MLP(model) if isinstance(model, MLPSpec) else model


def add_regularizer(loss: torch.Tensor, reg: torch.Tensor | None) -> torch.Tensor:
    """J = L + s, or L for a workload without s. Called with both as temporaries, it frees
    them as ``L + s`` written inline does (L, then s), so timelines match the replay."""
    return loss if reg is None else loss + reg


def meta_batch(workload: Workload, batch_size: int, device: str = "meta") -> tuple[Any, Any]:
    """A batch of ``batch_size`` rows without data, on the *meta* device (or ``device`` under
    fake tensors), in the structure ``make_batch`` gives (a tensor, a tuple, a dict). Which
    dimensions hold the batch is found by comparing a real batch of one row with one of two:
    each dimension grows by its difference per row, so a flat index tensor of k entries per
    row (an ``EmbeddingBag``'s) or a batch in dimension 1 is sized right too."""
    one, two = workload.make_batch(1, "cpu"), workload.make_batch(2, "cpu")
    grown = iter([torch.empty(tuple(a + (batch_size - 1) * (b - a) for a, b in zip(s.shape, t.shape, strict=True)),
                              dtype=s.dtype, device=device)
                  for s, t in zip(batch_tensors(*one), batch_tensors(*two), strict=True)])
    inputs = refill(one[0], grown)
    return inputs, refill(one[1], grown)
