"""MLPSpec and StepSpec validation, and the model, batch and regulariser built from them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bpmem.models.mlp import build, make_batch, regularizer, weight_matrices
from bpmem.spec import MLPSpec, SpecError
from bpmem.strategies.registry import make_step

ACTIVATION_CLASSES = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# validation

MLP_BAD = {
    "input_dim-0": ("input_dim", 0, [">= 1"]),
    "hidden_dim-negative": ("hidden_dim", -5, [">= 1"]),
    "output_dim-float": ("output_dim", 2.0, [">= 1"]),
    "depth-bool": ("depth", True, [">= 1"]),
    "depth-str": ("depth", "3", [">= 1"]),
    "bias-int": ("bias", 1, ["true", "false"]),
    "activation": ("activation", "foo", ["relu", "tanh", "sigmoid", "gelu"]),
    "loss": ("loss", "hinge", ["cross_entropy", "mse"]),
    "dtype": ("dtype", "float23", ["float32", "float64", "bfloat16", "float16"]),
    "l2-negative": ("l2", -1.0, [">= 0"]),
    "l2-bool": ("l2", True, [">= 0"]),
    "l2-str": ("l2", "0.1", [">= 0"]),
}
STEP_BAD = {
    "batch_size-0": ("batch_size", 0, [">= 1"]),
    "batch_size-str": ("batch_size", "x", [">= 1"]),
    "optimizer": ("optimizer", "rmsprop", ["sgd", "sgd-momentum", "adam"]),
    "mode": ("mode", "eval", ["train", "inference"]),
    "strategy": ("strategy", "offload", ["none"]),
}


def _check_spec_error(error: SpecError, field: str, value, allowed: list[str]) -> None:
    assert isinstance(error, ValueError)
    assert error.field == field
    assert error.value == value and type(error.value) is type(value)
    for fragment in allowed:
        assert fragment in error.allowed, (fragment, error.allowed)
    assert field in str(error) and error.allowed in str(error)


@pytest.mark.parametrize(("field", "value", "allowed"), MLP_BAD.values(), ids=MLP_BAD.keys())
def test_mlp_spec_rejects(field, value, allowed):
    with pytest.raises(SpecError) as info:
        MLPSpec(**{field: value})
    _check_spec_error(info.value, field, value, allowed)


@pytest.mark.parametrize(("field", "value", "allowed"), STEP_BAD.values(), ids=STEP_BAD.keys())
def test_step_spec_rejects(field, value, allowed):
    with pytest.raises(SpecError) as info:
        make_step(**{field: value})
    _check_spec_error(info.value, field, value, allowed)


def test_replace_validates_too():
    spec = MLPSpec()
    assert spec.replace(depth=2).depth == 2
    with pytest.raises(SpecError) as info:
        spec.replace(activation="swish")
    assert info.value.field == "activation"


def test_valid_edge_values_are_accepted():
    spec = MLPSpec(input_dim=1, hidden_dim=1, output_dim=1, depth=1, l2=0)
    assert spec.layer_dims() == [(1, 1), (1, 1)]
    assert make_step(batch_size=1).batch_size == 1


@pytest.mark.parametrize("spec", [MLPSpec(), make_step()], ids=["MLPSpec", "StepSpec"])
def test_specs_are_frozen(spec):
    name = dataclasses.fields(spec)[0].name
    before = getattr(spec, name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, name, 3)
    assert getattr(spec, name) == before
    hash(spec)  # frozen dataclasses are hashable, so specs can key caches


def test_defaults_are_the_seed_network():
    spec = MLPSpec()
    assert spec.layer_dims() == [(784, 256), (256, 10)]
    assert spec.bias is False and spec.activation == "relu" and spec.dtype == "float32"


def test_layer_dims_depth_3():
    spec = MLPSpec(input_dim=7, hidden_dim=5, output_dim=3, depth=3)
    assert spec.layer_dims() == [(7, 5), (5, 5), (5, 5), (5, 3)]


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_dtype_and_itemsize(dtype):
    spec = MLPSpec(dtype=dtype)
    assert spec.torch_dtype is TORCH_DTYPES[dtype]
    assert spec.itemsize == torch.empty(0, dtype=TORCH_DTYPES[dtype]).element_size()


# ---------------------------------------------------------------------------------------------
# build


@pytest.mark.parametrize("activation", ACTIVATION_CLASSES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_build_structure(activation, bias, dtype):
    spec = MLPSpec(input_dim=6, hidden_dim=4, output_dim=3, depth=3, bias=bias, activation=activation,
                   dtype=dtype)
    model = build(spec)
    assert isinstance(model, nn.Sequential)
    assert len(model) == 2 * spec.depth + 1
    dims = spec.layer_dims()
    for index, module in enumerate(model):
        if index % 2 == 0:
            assert type(module) is nn.Linear
            assert (module.in_features, module.out_features) == dims[index // 2]
            assert module.weight.dtype == TORCH_DTYPES[dtype]
            assert module.weight.shape == (dims[index // 2][1], dims[index // 2][0])
            if bias:
                assert module.bias is not None and module.bias.dtype == TORCH_DTYPES[dtype]
            else:
                assert module.bias is None
        else:
            assert type(module) is ACTIVATION_CLASSES[activation]
    assert all(p.device.type == "cpu" for p in model.parameters())
    x, _ = make_batch(spec, 2)
    assert model(x).shape == (2, spec.output_dim)
    assert model(x).dtype == TORCH_DTYPES[dtype]


def test_builds_with_the_same_seed_are_identical():
    spec = MLPSpec(input_dim=9, hidden_dim=7, output_dim=4, depth=2, bias=True)
    first, second = build(spec, seed=3), build(spec, seed=3)
    state_a, state_b = first.state_dict(), second.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    other = build(spec, seed=4)
    assert not torch.equal(other[0].weight, first[0].weight)


# ---------------------------------------------------------------------------------------------
# make_batch


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_make_batch_cross_entropy(dtype):
    spec = MLPSpec(input_dim=11, output_dim=5, loss="cross_entropy", dtype=dtype)
    x, y = make_batch(spec, 13)
    assert x.shape == (13, 11) and x.dtype == TORCH_DTYPES[dtype]
    assert y.shape == (13,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 5


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_make_batch_mse(dtype):
    spec = MLPSpec(input_dim=11, output_dim=5, loss="mse", dtype=dtype)
    x, y = make_batch(spec, 13)
    assert x.shape == (13, 11) and x.dtype == TORCH_DTYPES[dtype]
    assert y.shape == (13, 5) and y.dtype == TORCH_DTYPES[dtype]


def test_make_batch_is_seeded():
    spec = MLPSpec(input_dim=4, loss="mse")
    a, b, c = make_batch(spec, 3, seed=1), make_batch(spec, 3, seed=1), make_batch(spec, 3, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# ---------------------------------------------------------------------------------------------
# regularizer


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_regularizer_is_half_lambda_sum_of_squared_weights(depth, bias):
    spec = MLPSpec(input_dim=6, hidden_dim=5, output_dim=3, depth=depth, bias=bias, dtype="float64", l2=0.3)
    model = build(spec, seed=1)
    if bias:  # large biases would show up at once if they were regularised
        with torch.no_grad():
            for module in model:
                if isinstance(module, nn.Linear):
                    module.bias.fill_(100.0)
    expected = 0.0
    for module in model:
        if isinstance(module, nn.Linear):
            expected += float((module.weight.detach().double() ** 2).sum())
    expected *= 0.3 / 2
    value = regularizer(spec, model)
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert len(weight_matrices(model)) == depth + 1
    assert all(w.dim() == 2 for w in weight_matrices(model))


def test_regularizer_gradient_is_lambda_w():
    spec = MLPSpec(input_dim=4, hidden_dim=3, output_dim=2, bias=True, dtype="float64", l2=0.7)
    model = build(spec)
    regularizer(spec, model).backward()
    for module in model:
        if isinstance(module, nn.Linear):
            torch.testing.assert_close(module.weight.grad, 0.7 * module.weight.detach())
            assert module.bias.grad is None


def test_regularizer_zero_lambda_builds_no_term():
    """lambda = 0 is no regulariser at all, not a zero-weighted one whose backward allocates."""
    spec = MLPSpec(input_dim=4, hidden_dim=3, output_dim=2, l2=0.0)
    assert regularizer(spec, build(spec)) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_l2_must_be_finite(value):
    with pytest.raises(SpecError) as caught:
        MLPSpec(l2=value)
    assert caught.value.field == "l2"


def test_unhashable_dtype_is_a_spec_error():
    with pytest.raises(SpecError) as caught:
        MLPSpec(dtype=["float32"])
    assert caught.value.field == "dtype"


@pytest.mark.parametrize("field", ["lr", "momentum"])
def test_step_numbers_are_validated(field):
    with pytest.raises(SpecError) as caught:
        make_step(**{field: -1.0})
    assert caught.value.field == field
