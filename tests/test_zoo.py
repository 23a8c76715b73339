"""``bpmem.measure`` on real model shapes, each checked against a derivation written here
from what every op saves for backward (PyTorch's ``tools/autograd/derivatives.yaml``),
never by running the probe twice. Shapes are small; float32 unless stated (4 B).

The rules used (``derivatives.yaml`` names, what the op keeps):
- ``convolution``: ``input`` (and ``weight``, a parameter: never counted);
- ``native_batch_norm`` (training): ``input``, ``result1``/``result2`` (save_mean and
  save_invstd, C floats each), ``running_mean``/``running_var`` (buffers: never counted);
- ``relu``, ``sigmoid``, ``tanh``: ``result``; ``gelu``: ``self``;
- ``max_pool2d_with_indices``: ``self`` and ``result1`` (int64 indices);
- ``addmm``/``mm``/``linear``: ``mat1`` (the input) when the weight needs a gradient, and the
  weight when the input needs one (a parameter: never counted);
- ``_log_softmax``: ``result``; ``nll_loss_forward``: ``self``, ``target`` (int64) and
  ``total_weight`` (one float);
- ``native_layer_norm``: ``input``, ``result1``/``result2`` (mean and rstd: one float per row);
- dropout on the CPU: ``input * noise`` with a float ``noise`` the input's size (``mul`` keeps
  ``other``); the fused ``native_dropout`` with a bool mask is the CUDA path;
- ``embedding``: ``indices`` (int64);
- ``_scaled_dot_product_flash_attention_for_cpu``: ``query``, ``key``, ``value``, ``output``,
  ``logsumexp`` (one float per head and query row);
- ``mul``: ``other`` when ``self`` needs a gradient, ``self`` when ``other`` does; ``add``: nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import bpmem
from tests.fixtures import zoo
from tests.fixtures.zoo import FF, HEADS, VOCAB, B, C, D, E, H, K, L

F32, I64 = 4, 8


def _loss_bytes(rows: int, classes: int, itemsize: int = F32) -> int:
    """cross_entropy: log_softmax's result, the int64 target, nll_loss's total_weight."""
    return rows * classes * itemsize + rows * I64 + itemsize


def _saved(model: nn.Module, step) -> bpmem.measurement.api.Measurement:  # type: ignore[name-defined]
    with bpmem.measure(model) as m:
        step()
    return m


# -- a CNN: Conv2d, BatchNorm2d, ReLU, MaxPool2d, Linear ------------------------------------

_cnn = zoo.cnn


def cnn_derivation() -> int:
    x = B * 3 * H * H * F32  # conv saves its input (the batch)
    conv = B * C * H * H * F32  # batch norm saves its input
    stats = 2 * C * F32  # save_mean, save_invstd
    relu = B * C * H * H * F32  # relu's result, also max-pool's self: one storage
    indices = B * C * (H // 2) ** 2 * I64
    pooled = B * C * (H // 2) ** 2 * F32  # the Linear's input (flatten is a view of it)
    return x + conv + stats + relu + indices + pooled + _loss_bytes(B, K)


def test_cnn_saves_what_its_ops_keep() -> None:
    model = _cnn()
    x, y = torch.randn(B, 3, H, H), torch.randint(0, K, (B,))
    m = _saved(model, lambda: F.cross_entropy(model(x), y).backward())
    assert m.saved_activation_bytes == cnn_derivation()


# -- a transformer block: SDPA attention, LayerNorm, GELU, dropout ----------------------------

Block = zoo.Block


def transformer_derivation() -> int:
    rows = B * L
    norm1 = rows * E * F32 + 2 * rows * F32  # the input x, mean and rstd
    qkv_in = rows * E * F32  # norm1's output
    qkv = rows * 3 * E * F32  # one storage: q, k and v are views of the qkv projection
    # the CPU flash kernel's output and logsumexp; the output lies in memory as (B, L, heads,
    # E/heads), so transpose(1, 2).reshape is a view, and the out-projection keeps no copy
    attention = rows * E * F32 + B * HEADS * L * F32
    norm2 = rows * E * F32 + 2 * rows * F32  # the first residual sum, mean and rstd
    up_in = rows * E * F32  # norm2's output
    gelu_in = rows * FF * F32  # the up-projection's output
    down_in = rows * FF * F32  # gelu's output
    noise = rows * E * F32  # dropout's float noise (the CPU path)
    return norm1 + qkv_in + qkv + attention + norm2 + up_in + gelu_in + down_in + noise


def test_transformer_block_saves_what_its_ops_keep() -> None:
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(B, L, E)
    m = _saved(model, lambda: model(x).sum().backward())
    assert m.saved_activation_bytes == transformer_derivation()
    assert any(name.startswith("norm1") for name, _ in m.top_saved(20))


# -- an embedding whose weight is tied to the output layer ------------------------------------

Tied = zoo.Tied


def tied_derivation() -> int:
    rows = B * L
    indices = rows * I64  # embedding keeps its indices (the batch)
    embedded = rows * D * F32  # the mix Linear's input
    tanh = rows * D * F32  # tanh's result, also the head's input
    return indices + embedded + tanh + _loss_bytes(rows, VOCAB)


def test_tied_embedding_counts_the_shared_weight_never() -> None:
    torch.manual_seed(0)
    model = Tied()
    tokens, targets = torch.randint(0, VOCAB, (B, L)), torch.randint(0, VOCAB, (B * L,))
    m = _saved(model, lambda: F.cross_entropy(model(tokens).view(-1, VOCAB), targets).backward())
    assert m.saved_activation_bytes == tied_derivation()


# -- a frozen backbone with a trainable head -------------------------------------------------

def test_frozen_layers_and_backbones_save_no_weight() -> None:
    """The issue's model: Linear -> ReLU -> Linear(frozen) -> ReLU -> Linear at 24 rows of 256.
    Saved: the batch (the first Linear's weight needs it), both ReLU results (the frozen
    Linear needs no input, only its weight, which is a parameter)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    model[2].requires_grad_(False)
    x = torch.randn(24, 256)
    m = _saved(model, lambda: model(x).sum().backward())
    assert m.saved_activation_bytes == 3 * 24 * 256 * F32 == 73_728

    backbone = _cnn()
    backbone.requires_grad_(False)
    backbone[5].requires_grad_(True)  # only the head trains: only its input is kept
    x, y = torch.randn(B, 3, H, H), torch.randint(0, K, (B,))
    m = _saved(backbone, lambda: F.cross_entropy(backbone(x), y).backward())
    assert m.saved_activation_bytes == B * C * (H // 2) ** 2 * F32 + _loss_bytes(B, K)


# -- in-place ops ---------------------------------------------------------------------------

def test_in_place_relu_and_add_keep_one_storage() -> None:
    """ReLU(inplace=True) overwrites the Linear's output and saves that same storage;
    ``add_`` of a constant saves nothing; ``mul`` by a tensor saves both factors."""
    torch.manual_seed(0)
    first, second = nn.Linear(20, 30), nn.Linear(30, 5)
    model = nn.Sequential(first, nn.ReLU(inplace=True), second)
    x = torch.randn(B, 20)

    def step() -> None:
        h = model[1](first(x))  # one (B, 30) storage: the relu result, kept by relu and by `second`
        h2 = second(h).add_(1.0)
        (h2 * h2.detach().sigmoid()).sum().backward()

    m = _saved(model, step)
    # x (the first Linear's input); the relu result, which is also the second Linear's input;
    # mul keeps its other factor (the sigmoid) only: the detached factor needs no gradient
    derivation = B * 20 * F32 + B * 30 * F32 + B * 5 * F32
    assert m.saved_activation_bytes == derivation


# -- no_grad and inference_mode: nothing is saved, and a peak counts only new storages --------

def test_no_grad_and_inference_mode_save_nothing_and_count_only_new_memory() -> None:
    lin = nn.Linear(1024, 1024)
    x = torch.randn(1, 1024)
    for context in (torch.no_grad, torch.inference_mode):
        with context(), bpmem.measure() as m:
            lin(x)
        assert m.saved_activation_bytes == 0
        assert m.peak_bytes == 1 * 1024 * F32  # the output; W.t() is a view of the old weight
        [(name, nbytes)] = m.top_live()
        assert nbytes == 4096 and name in ("Linear (addmm)", "Linear (linear)")  # inference_mode: one op


# -- torch.utils.checkpoint -------------------------------------------------------------------

def test_a_checkpointed_block_keeps_only_its_input() -> None:
    """Non-reentrant checkpoint saves the segment's inputs through autograd (``ctx``), and
    keeps nothing of the segment's forward. In backward it recomputes the segment into
    frames of its own, out of autograd's saved tensors (``peak_bytes`` sees them live)."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh())
    head = nn.Linear(32, 4)
    model = nn.Sequential(inner, head)
    x = torch.randn(B, 32, requires_grad=True)

    def step() -> None:
        h = checkpoint(inner, x, use_reentrant=False)
        head(h).sum().backward()

    m = _saved(model, step)
    # the segment's input x, and h (the last tanh's result), which the head Linear keeps
    assert m.saved_activation_bytes == B * 32 * F32 + B * 32 * F32
    with bpmem.measure(model) as plain:
        head(inner(x)).sum().backward()
    # without the checkpoint: x, tanh1's result, tanh2's result (h, also the head's input)
    assert plain.saved_activation_bytes == B * 32 * F32 + B * 64 * F32 + B * 32 * F32


# -- bfloat16 -------------------------------------------------------------------------------------

def test_a_bfloat16_model_saves_two_bytes_per_element() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 6)).to(torch.bfloat16)
    x = torch.randn(B, 40, dtype=torch.bfloat16)
    y = torch.randint(0, 6, (B,))
    m = _saved(model, lambda: F.cross_entropy(model(x), y).backward())
    bf16 = 2
    # x; gelu's input (the first Linear's output); the second Linear's input (gelu's result)
    assert m.saved_activation_bytes == B * 40 * bf16 + 2 * B * 24 * bf16 + _loss_bytes(B, 6, bf16)
