"""The seed's forward and backward propagation written out by hand, for any MLPSpec.

Row-major batched form (exercise 1): a batch X is (B, d) and every layer i = 1..depth+1 computes

    Z_i = H_{i-1} W_i^T (+ b_i),   H_0 = X,   H_i = phi(Z_i) for hidden layers,   O = Z_{depth+1}

so, with G_i = dJ/dZ_i of shape (B, out_i), the seed's equations become

    dJ/dO   = dL/dO                          (B, q)
    dJ/dW_i = G_i^T H_{i-1} + lambda W_i     (out_i, in_i), the shape of W_i
    dJ/db_i = sum_batch G_i                  (out_i,), the shape of b_i
    dJ/dH_i = G_{i+1} W_{i+1}                (B, hidden_dim)
    dJ/dZ_i = dJ/dH_i (.) phi'(Z_i)          (B, hidden_dim)

The seed's column form dJ/dW = (dJ/dz) x^T is the B = 1 case transposed: each row of X adds one
outer product, which is why the batch dimension disappears from every parameter gradient.

Bias variant (exercise 2), one example:  z = W x + b,  h = phi(z),  o = W2 h + b2.  Since
dz/db = I, dJ/db = dJ/dz (and dJ/db2 = dJ/do); over a batch, dJ/db = sum over rows of dJ/dZ.
The bias is not regularised (s only sums ||W||_F^2), so it gets no lambda term.

Second derivatives (exercise 4): see ``hessian_vector_product``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bpmem.models.mlp import objective
from bpmem.spec import MLPSpec

Params = Sequence[tuple[Tensor, Tensor | None]]


def params_of(model: nn.Module) -> list[tuple[Tensor, Tensor | None]]:
    """(W, b or None) of every Linear of a ``build(spec)`` model, input side first."""
    return [(m.weight, m.bias) for m in model.modules() if isinstance(m, nn.Linear)]


def _phi(name: str, z: Tensor) -> Tensor:
    if name == "relu":
        return torch.where(z > 0, z, torch.zeros_like(z))
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "gelu":  # exact (erf) GELU, nn.GELU's default: z * Phi(z)
        return z * 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5)))
    raise ValueError(f"unknown activation {name!r}")


def _phi_prime(name: str, z: Tensor, h: Tensor) -> Tensor:
    """phi'(z); tanh and sigmoid reuse the stored h = phi(z) instead of recomputing it."""
    if name == "relu":  # 0 at z == 0, the same subgradient autograd picks
        return (z > 0).to(z.dtype)
    if name == "tanh":
        return 1.0 - h * h
    if name == "sigmoid":
        return h * (1.0 - h)
    if name == "gelu":  # d/dz [z Phi(z)] = Phi(z) + z pdf(z)
        cdf = 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf
    raise ValueError(f"unknown activation {name!r}")


@dataclass(frozen=True)
class ForwardCache:
    """Every intermediate of the forward pass; exactly what the backward pass must keep.

    ``z[i]`` and ``h[i]`` are the pre-activation and activation of hidden layer i + 1, each
    (B, hidden_dim); ``o`` is (B, q); ``L``, ``s``, ``J`` are 0-d.
    """

    x: Tensor
    y: Tensor
    z: tuple[Tensor, ...]
    h: tuple[Tensor, ...]
    o: Tensor
    L: Tensor
    s: Tensor
    J: Tensor


@dataclass(frozen=True)
class Gradients:
    """Hand-computed gradients for a batch of B rows (shapes are exercise 1's answer).

    ``dW[i]``: (out_i, in_i), W_i's shape.  ``db[i]``: (out_i,) or None without bias.
    ``do``: dJ/do, (B, q).  ``dh[i]``, ``dz[i]``: dJ/dh and dJ/dz of hidden layer i + 1,
    each (B, hidden_dim).  Lists are ordered input side first, like ``params_of``.
    """

    do: Tensor
    dW: tuple[Tensor, ...]
    db: tuple[Tensor | None, ...]
    dh: tuple[Tensor, ...]
    dz: tuple[Tensor, ...]

    def parameter_grads(self) -> list[Tensor]:
        """In ``model.parameters()`` order (W1, b1, W2, b2, ...), biases skipped when absent."""
        out: list[Tensor] = []
        for dw, db in zip(self.dW, self.db, strict=True):
            out.append(dw)
            if db is not None:
                out.append(db)
        return out


def _loss(spec: MLPSpec, o: Tensor, y: Tensor) -> Tensor:
    if spec.loss == "cross_entropy":  # mean_b [logsumexp(o_b) - o_b[y_b]]
        return (torch.logsumexp(o, dim=1) - o.gather(1, y.unsqueeze(1)).squeeze(1)).mean()
    return ((o - y) ** 2).mean()  # mean over all B*q elements, as F.mse_loss does


def forward(spec: MLPSpec, params: Params, x: Tensor, y: Tensor) -> ForwardCache:
    """z_i = H_{i-1} W_i^T (+ b_i), h_i = phi(z_i), o = H_depth W^T (+ b), J = L + s.

    Plain tensor ops only, so it is also differentiable by autograd if called with grad on.
    """
    zs: list[Tensor] = []
    hs: list[Tensor] = []
    a = x
    for i, (w, b) in enumerate(params):
        pre = a @ w.T
        if b is not None:
            pre = pre + b  # broadcast over the batch: one b shared by all rows
        if i == len(params) - 1:
            a = pre
            break
        zs.append(pre)
        a = _phi(spec.activation, pre)
        hs.append(a)
    o = a
    L = _loss(spec, o, y)
    s = sum((w * w).sum() for w, _ in params) * (spec.l2 / 2)  # weights only, never biases
    return ForwardCache(x=x, y=y, z=tuple(zs), h=tuple(hs), o=o, L=L, s=s, J=L + s)


def _dloss_do(spec: MLPSpec, o: Tensor, y: Tensor) -> Tensor:
    batch = o.shape[0]
    if spec.loss == "cross_entropy":
        softmax = torch.exp(o - torch.logsumexp(o, dim=1, keepdim=True))
        onehot = torch.zeros_like(o).scatter_(1, y.unsqueeze(1), 1.0)
        return (softmax - onehot) / batch  # the 1/B comes from the batch mean in L
    return 2.0 * (o - y) / o.numel()  # numel = B*q, the mean's denominator


@torch.no_grad()  # no autograd anywhere: every gradient below is an explicit equation
def backward(spec: MLPSpec, params: Params, cache: ForwardCache) -> Gradients:
    """The seed's chain rule, output side first; see the module docstring for the shapes."""
    do = _dloss_do(spec, cache.o, cache.y)  # dJ/dL = 1, so dJ/do = dL/do
    inputs = (cache.x, *cache.h)  # H_{i-1}: the input each Linear saw
    dW: list[Tensor] = []
    db: list[Tensor | None] = []
    dh: list[Tensor] = []
    dz: list[Tensor] = []
    g = do  # G_i = dJ/d(pre-activation of layer i); for the last Linear that is dJ/do
    for i in range(len(params) - 1, -1, -1):
        w, b = params[i]
        dW.append(g.T @ inputs[i] + spec.l2 * w)  # data term + ds/dW = lambda W
        db.append(g.sum(dim=0) if b is not None else None)
        if i == 0:
            break  # dJ/dX is not needed: X is data, not a parameter
        grad_h = g @ w
        g = grad_h * _phi_prime(spec.activation, cache.z[i - 1], cache.h[i - 1])
        dh.append(grad_h)
        dz.append(g)
    return Gradients(
        do=do,
        dW=tuple(reversed(dW)),
        db=tuple(reversed(db)),
        dh=tuple(reversed(dh)),
        dz=tuple(reversed(dz)),
    )


def hessian_vector_product(
    spec: MLPSpec, model: nn.Module, x: Tensor, y: Tensor, vector: Sequence[Tensor]
) -> list[Tensor]:
    """H v for J w.r.t. all of ``model.parameters()`` (``vector`` in that order), by double backward.

    create_graph=True makes the first backward record its own ops (softmax, phi', the G^T H
    matmuls, ...) as a new graph whose leaves are the parameters, while keeping the forward
    graph alive because that backward graph refers to the forward's saved tensors. So during the
    second backward both graphs are retained: roughly twice the saved activations of a plain
    training step, plus a second pass of compute. Fine for a few HVPs; forming the full Hessian
    this way (one HVP per parameter) is not a good idea.
    """
    params = list(model.parameters())
    if len(vector) != len(params):
        raise ValueError(f"vector has {len(vector)} tensors, model has {len(params)} parameters")
    J = objective(spec, model, x, y)
    grads = torch.autograd.grad(J, params, create_graph=True)
    dot = sum(
        (g * v).sum() for g, v in zip(grads, vector, strict=True)
    )  # (dJ/dtheta) . v, still differentiable
    return list(torch.autograd.grad(dot, params))
