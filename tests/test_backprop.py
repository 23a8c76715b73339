"""The hand-written backward against autograd, its shapes, and the double-backward HVP."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bpmem.models.backprop import (
    ForwardCache,
    Gradients,
    backward,
    forward,
    hessian_vector_product,
    params_of,
)
from bpmem.models.mlp import build, data_loss, make_batch, objective, regularizer
from bpmem.spec import ACTIVATIONS, LOSSES, MLPSpec

TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _spec(depth: int, bias: bool, activation: str, loss: str, l2: float = 0.1, **dims: int) -> MLPSpec:
    sizes = {"input_dim": 6, "hidden_dim": 5, "output_dim": 4} | dims
    return MLPSpec(depth=depth, bias=bias, activation=activation, loss=loss, dtype="float64", l2=l2, **sizes)


def _hand(
    spec: MLPSpec, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[ForwardCache, Gradients]:
    params = params_of(model)
    with torch.no_grad():
        cache = forward(spec, params, x, y)
    return cache, backward(spec, params, cache)


def _check_against_autograd(spec: MLPSpec, batch: int, seed: int) -> None:
    model = build(spec, seed=seed)
    x, y = make_batch(spec, batch, seed=seed)
    cache, grads = _hand(spec, model, x, y)

    J = objective(spec, model, x, y)
    expected = torch.autograd.grad(J, list(model.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(cache.J, J.detach(), **TIGHT)
        torch.testing.assert_close(cache.L, data_loss(spec, model(x), y), **TIGHT)
        s = regularizer(spec, model)  # None for lambda = 0: no term, which the hand-written s = 0 stands for
        torch.testing.assert_close(cache.s, s if s is not None else torch.zeros_like(cache.s), **TIGHT)
        torch.testing.assert_close(cache.o, model(x), **TIGHT)
    got = grads.parameter_grads()
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **TIGHT)


@pytest.mark.parametrize(
    ("depth", "bias", "activation", "loss"),
    list(itertools.product([1, 2, 3, 4], [False, True], ACTIVATIONS, LOSSES)),
)
def test_backward_matches_autograd(depth: int, bias: bool, activation: str, loss: str) -> None:
    _check_against_autograd(_spec(depth, bias, activation, loss), batch=7, seed=depth)


@settings(max_examples=25, deadline=None)
@given(
    depth=st.integers(1, 4),
    bias=st.booleans(),
    activation=st.sampled_from(ACTIVATIONS),
    loss=st.sampled_from(LOSSES),
    dims=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    batch=st.integers(1, 8),
    l2=st.sampled_from([0.0, 1e-3, 0.5]),
    seed=st.integers(0, 1000),
)
def test_backward_matches_autograd_random_specs(
    depth: int,
    bias: bool,
    activation: str,
    loss: str,
    dims: tuple[int, int, int],
    batch: int,
    l2: float,
    seed: int,
) -> None:
    d, h, q = dims
    spec = _spec(depth, bias, activation, loss, l2=l2, input_dim=d, hidden_dim=h, output_dim=q)
    _check_against_autograd(spec, batch=batch, seed=seed)


@pytest.mark.parametrize("bias", [False, True])
def test_gradient_shapes_for_a_batch(bias: bool) -> None:
    """Exercise 1: B=5, d=7, h=4, q=3, depth 2."""
    B, d, h, q = 5, 7, 4, 3
    spec = _spec(2, bias, "tanh", "cross_entropy", input_dim=d, hidden_dim=h, output_dim=q)
    model = build(spec)
    cache, grads = _hand(spec, model, *make_batch(spec, B))

    assert [tuple(t.shape) for t in cache.z] == [(B, h), (B, h)]
    assert [tuple(t.shape) for t in cache.h] == [(B, h), (B, h)]
    assert cache.o.shape == (B, q) and cache.J.shape == ()
    assert grads.do.shape == (B, q)
    assert [tuple(t.shape) for t in grads.dW] == [(h, d), (h, h), (q, h)]
    assert [tuple(t.shape) for t in grads.dh] == [(B, h), (B, h)]
    assert [tuple(t.shape) for t in grads.dz] == [(B, h), (B, h)]
    if bias:
        assert [tuple(t.shape) for t in grads.db if t is not None] == [(h,), (h,), (q,)]
    else:
        assert grads.db == (None, None, None)
    for (w, b), dw, db in zip(params_of(model), grads.dW, grads.db, strict=True):
        assert dw.shape == w.shape
        assert (db is None) == (b is None) and (b is None or db.shape == b.shape)


def test_backward_records_no_graph() -> None:
    spec = _spec(2, True, "gelu", "mse")
    model = build(spec)
    x, y = make_batch(spec, 3)
    params = params_of(model)
    cache = forward(spec, params, x, y)  # grad on: forward is differentiable, backward is not
    assert cache.J.requires_grad
    grads = backward(spec, params, cache)
    assert not any(t.requires_grad for t in grads.parameter_grads())


@pytest.mark.parametrize(
    ("activation", "loss", "bias"),
    list(itertools.product(["tanh", "gelu", "sigmoid", "relu"], LOSSES, [False, True])),
)
def test_hvp_matches_finite_difference(activation: str, loss: str, bias: bool) -> None:
    """H v against (g(theta + eps v) - g(theta - eps v)) / (2 eps), g the hand-written gradient."""
    spec = _spec(2, bias, activation, loss)
    model = build(spec, seed=3)
    x, y = make_batch(spec, 6, seed=3)
    generator = torch.Generator().manual_seed(4)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]
    hv = hessian_vector_product(spec, model, x, y, vector)

    eps = 1e-6

    def grad_at(sign: float) -> list[torch.Tensor]:
        with torch.no_grad():
            shifted = [p + sign * eps * v for p, v in zip(model.parameters(), vector, strict=True)]
            it = iter(shifted)
            params = [(next(it), next(it) if b is not None else None) for _, b in params_of(model)]
            return backward(spec, params, forward(spec, params, x, y)).parameter_grads()

    fd = [(a - b) / (2 * eps) for a, b in zip(grad_at(1.0), grad_at(-1.0), strict=True)]
    assert len(hv) == len(fd)
    scale = max(t.abs().max().item() for t in fd)
    for h_, f_ in zip(hv, fd, strict=True):
        assert h_.shape == f_.shape
        torch.testing.assert_close(h_, f_, rtol=1e-6, atol=1e-6 * scale)


def test_hvp_is_linear_and_symmetric() -> None:
    """u . (H v) == v . (H u): the Hessian is symmetric, a check independent of finite differences."""
    spec = _spec(3, True, "tanh", "cross_entropy")
    model = build(spec, seed=1)
    x, y = make_batch(spec, 4, seed=1)
    generator = torch.Generator().manual_seed(2)
    u = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]
    hu = hessian_vector_product(spec, model, x, y, u)
    hv = hessian_vector_product(spec, model, x, y, v)
    u_hv = sum((a * b).sum() for a, b in zip(u, hv, strict=True))
    v_hu = sum((a * b).sum() for a, b in zip(v, hu, strict=True))
    torch.testing.assert_close(u_hv, v_hu, **TIGHT)
    h2v = hessian_vector_product(spec, model, x, y, [2 * t for t in v])
    for a, b in zip(h2v, hv, strict=True):
        torch.testing.assert_close(a, 2 * b, **TIGHT)


def test_hvp_rejects_wrong_length() -> None:
    spec = _spec(1, False, "tanh", "mse")
    model = build(spec)
    x, y = make_batch(spec, 2)
    with pytest.raises(ValueError, match="parameters"):
        hessian_vector_product(spec, model, x, y, [torch.zeros(1, dtype=torch.float64)])
