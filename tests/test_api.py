"""``bpmem.measure`` on user code: the four reproductions that were wrong, determinism over
runs and steps, nesting, attribution by module path, and a limit that pins a figure to the
byte in a user's own pytest project."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_zoo import B, Block, H, K, Tied, _cnn, cnn_derivation
from torch import nn

import bpmem
from bpmem.measurement.step import make_optimizer, train_step
from bpmem.models.mlp import build, make_batch
from bpmem.predict.estimate import estimate
from bpmem.spec import MLPSpec
from bpmem.strategies.registry import make_step
from tests.fixtures import zoo

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_a_view_of_an_older_storage_allocates_nothing() -> None:
    """Reproduction 1: ``W.t()`` is a view of the weight; the only new memory is the output."""
    lin, x = nn.Linear(1024, 1024), torch.randn(1, 1024)
    with torch.no_grad(), bpmem.measure() as m:
        lin(x)
    assert m.peak_bytes == 1024 * 4


Checkpointed = zoo.CheckpointedInside  # a block under non-reentrant checkpoint, then a head


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.relu, self.second = nn.Linear(20, 30), nn.ReLU(inplace=True), nn.Linear(30, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.relu(self.first(x))).add_(1.0)


def _frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    model[2].requires_grad_(False)
    return model


def _bf16() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 6)).to(torch.bfloat16)


MODELS = {
    "cnn": (_cnn, lambda: (torch.randn(B, 3, H, H),), lambda out: F.cross_entropy(out, torch.arange(B) % K)),
    "frozen": (_frozen, lambda: (torch.randn(24, 256),), lambda out: out.sum()),
    "in-place": (InPlace, lambda: (torch.randn(B, 20),), lambda out: out.square().sum()),
    "checkpointed": (Checkpointed, lambda: (torch.randn(B, 32, requires_grad=True),), lambda out: out.sum()),
    "bfloat16": (_bf16, lambda: (torch.randn(B, 40, dtype=torch.bfloat16),),
                 lambda out: F.cross_entropy(out, torch.arange(B) % 6)),
    "transformer": (Block, lambda: (torch.randn(B, 6, 16),), lambda out: out.sum()),
    "tied": (Tied, lambda: (torch.randint(0, 50, (B, 6)),), lambda out: out.logsumexp(-1).sum()),
}


def _steps(name: str, steps: int) -> tuple[int, int]:
    make, batch, loss = MODELS[name]
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    inputs = batch()
    with bpmem.measure(model, optimizer, inputs) as m:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss(model(*inputs)).backward()
            optimizer.step()
    return m.saved_activation_bytes, m.peak_bytes


@pytest.mark.parametrize("name", sorted(MODELS))
def test_views_and_in_place_ops_on_old_tensors_allocate_nothing(name: str) -> None:
    """Every parameter, buffer and input existed before the block: viewing them, or changing
    them in place, adds nothing to the peak."""
    make, batch, _ = MODELS[name]
    model, inputs = make(), batch()
    with torch.no_grad(), bpmem.measure(model) as m:
        for param in model.parameters():
            param.t() if param.dim() == 2 else param.view(-1)
            param.mul_(1)
        for buffer in model.buffers():
            buffer.add_(0)
        for tensor in inputs:
            tensor.unsqueeze(0)[0].reshape(-1)
    assert m.peak_bytes == 0 and m.saved_activation_bytes == 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_saved_is_the_same_in_ten_runs_and_over_one_two_three_steps(name: str) -> None:
    """Reproduction 2: what autograd holds is freed with each step's graph, so the largest
    total is one step's, whatever the run and however many steps the block holds."""
    runs = {_steps(name, 1) for _ in range(10)}
    assert len(runs) == 1
    saved = next(iter(runs))[0]
    assert {_steps(name, steps)[0] for steps in (2, 3)} == {saved}
    if name == "cnn":
        assert saved == cnn_derivation()
    if name == "frozen":
        assert saved == 73_728


def test_measurements_nest_and_both_are_right() -> None:
    """Reproduction 3: an inner measurement no longer blinds the outer one."""
    model, x, y = _cnn(), torch.randn(B, 3, H, H), torch.arange(B) % K
    with bpmem.measure(model) as outer:
        with bpmem.measure(model) as inner:
            F.cross_entropy(model(x), y).backward()
        with bpmem.measure(model, peak=False) as second:
            F.cross_entropy(model(x), y).backward()
    assert outer.saved_activation_bytes == inner.saved_activation_bytes == second.saved_activation_bytes
    assert inner.saved_activation_bytes == cnn_derivation()
    assert outer.peak_bytes >= inner.peak_bytes > 0


def test_buffers_and_frozen_weights_never_count() -> None:
    """Reproduction 4 is in the zoo (73,728 B); here BatchNorm's running statistics, which
    ``native_batch_norm`` saves, are excluded even without a model to name them."""
    model, x = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), torch.randn(4, 8)
    with bpmem.measure() as m:
        model(x).sum().backward()
    # the Linear's input; batch norm's input (the Linear's output), save_mean and save_invstd
    assert m.saved_activation_bytes == 4 * 8 * 4 + 4 * 8 * 4 + 2 * 8 * 4


def test_attribution_names_non_leaf_modules_by_path() -> None:
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                    enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    with bpmem.measure(encoder) as m:
        encoder(x).sum().backward()
    modules = {name.split(" ")[0] for name, _ in m.top_saved(50)}
    assert "layers.0.self_attn" in modules and "layers.1.self_attn" in modules
    assert "outside" not in modules
    assert sum(nbytes for _, nbytes in m.top_saved(50)) == m.saved_activation_bytes


def test_peak_breakdown_adds_up_and_names_gradients_and_optimizer_state() -> None:
    model, x, y = _cnn(), torch.randn(B, 3, H, H), torch.arange(B) % K
    optimizer = torch.optim.Adam(model.parameters())
    with bpmem.measure(model, optimizer, [x, y]) as m:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert sum(m.peak_breakdown.values()) == m.peak_bytes
    params = sum(p.numel() * 4 for p in model.parameters())
    assert m.resident["parameters"] == params and m.resident["inputs"] == x.numel() * 4 + y.numel() * 8
    assert m.resident["buffers"] == sum(b.numel() * b.element_size() for b in model.buffers())
    # Adam's first step makes exp_avg and exp_avg_sq (2x params) and a step count per parameter
    with bpmem.measure(model, optimizer) as again:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    # backward makes gradients from the last layer to the first, so the gradients live at the
    # peak are those of a run of the last layers: a suffix of the parameters, never a mix
    sizes = [p.numel() * 4 for p in model.parameters()]
    suffixes = {sum(sizes[k:]) for k in range(len(sizes) + 1)}
    assert again.peak_breakdown["gradients"] in suffixes - {0}
    assert again.peak_breakdown["optimizer"] == 0  # Adam's state was made in the block before


USER_TEST = '''
import pytest, torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))

@pytest.mark.limit_tensor_memory(saved={limit})
def test_step():
    model = make()
    model[2].requires_grad_(False)
    model(torch.randn(24, 256)).sum().backward()
'''


@pytest.mark.slow
@pytest.mark.parametrize("limit,passes", [(73_728, True), (73_727, False)])
def test_a_limit_pins_the_figure_to_the_byte_in_a_users_project(tmp_path: Path, limit: int, passes: bool) -> None:
    """A real pytest run in a project folder of its own, the plugin found by its entry point."""
    (tmp_path / "test_user.py").write_text(USER_TEST.format(limit=limit))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_user.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == passes, done.stdout + done.stderr
    if not passes:
        message = textwrap.dedent(done.stdout)
        assert "saved_activation_bytes 72.0 KiB (73,728 B) exceeds the limit" in message
        # without a model, modules are named by class: both ReLU results, and the batch that
        # the test body made with randn (the first Linear's input)
        assert "largest saved tensors: ReLU (relu) 48.0 KiB, Linear (randn) 24.0 KiB" in message


@pytest.mark.parametrize("spec", [
    MLPSpec(),  # the seed network: 269,316 B with its batch
    MLPSpec(input_dim=30, hidden_dim=20, output_dim=7, depth=3, bias=True, activation="gelu", loss="mse"),
    MLPSpec(input_dim=30, hidden_dim=20, output_dim=7, depth=2, activation="tanh", dtype="float64"),
])
def test_the_api_agrees_with_the_analytic_model_on_bpmems_own_mlp(spec: MLPSpec) -> None:
    """Two independent routes to one number: bpmem.measure around a training step (two steps
    in one block), and the estimate's arithmetic from autograd's rules."""
    step = make_step(batch_size=64, optimizer="adam")
    model = build(spec, "cpu", seed=0)
    optimizer = make_optimizer(step, model)
    x, y = make_batch(spec, step.batch_size, "cpu", seed=0)
    with bpmem.measure(model, optimizer) as m:
        for _ in range(2):
            train_step(spec, model, optimizer, x, y)
    assert m.saved_activation_bytes == estimate(spec, step).saved_activation_bytes
    if spec == MLPSpec():
        assert m.saved_activation_bytes == 269_316


@pytest.mark.parametrize("depth", [2, 3])
def test_nested_peaks_equal_the_peak_alone(depth: int) -> None:
    """A weight used twice (Linear and a penalty) gets its two gradients summed in place only
    when no dispatch mode is active: every nested probe must step aside there, or the outer
    peak gains an out-of-place sum that the unwatched step never allocates."""
    model, x, y = _cnn(), torch.randn(B, 3, H, H), torch.arange(B) % K
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) + sum(p.pow(2).sum() for p in model.parameters())).backward()
        optimizer.step()

    step()  # steady state
    with bpmem.measure(model) as alone:
        step()
    with contextlib.ExitStack() as stack:
        nested = [stack.enter_context(bpmem.measure(model)) for _ in range(depth)]
        step()
    assert [m.peak_bytes for m in nested] == [alone.peak_bytes] * depth
    assert [m.saved_activation_bytes for m in nested] == [alone.saved_activation_bytes] * depth


# -- found by review: each of these was wrong before its fix ------------------------------------

def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)), torch.randn(64, 256)


def test_a_gradient_sum_made_while_the_probe_stands_aside_is_counted() -> None:
    """h + h sends two gradients to h that cannot be summed in place; the sum is a new 2 MiB
    buffer. The CPU allocator's own trace is the referee."""
    from bpmem.probes import AllocatorTraceProbe

    model, x = nn.Linear(16, 8192), torch.randn(64, 16)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        h = model(x)
        (h + h).sum().backward()

    step()
    with bpmem.measure(model) as m:
        step()
    model.zero_grad(set_to_none=True)
    with AllocatorTraceProbe() as trace:
        h = model(x)
        (h + h).sum().backward()
    assert m.peak_bytes == trace.peak_bytes


def test_many_graphs_in_one_block_are_all_watched() -> None:
    """Nodes were remembered by id; a freed node's id went to a new node, left unhooked."""
    w = nn.Parameter(torch.randn(1 << 16))

    def one() -> None:
        z = w * 2
        (z + w * 3).sum().backward()
        w.grad = None

    peaks = []
    for steps in (1, 2, 16):
        with bpmem.measure() as m:
            for _ in range(steps):
                one()
        peaks.append(m.peak_bytes)
    assert peaks == [peaks[0]] * 3


def test_a_graph_deleted_without_backward_is_freed_at_once() -> None:
    """The saved ReLU output used to hold its own node through the probe's wrapper (a
    reference cycle), so deleted graphs piled up until the garbage collector ran."""
    model, x = _mlp()
    with bpmem.measure(model) as m:
        for _ in range(3):
            y = model(x).sum()
            del y
    assert m.saved_activation_bytes == 64 * 256 * 4 * 2  # one graph's: x and the ReLU result


def test_a_measurement_in_another_thread_sees_its_own_block() -> None:
    import threading

    model, x = _mlp()
    seen = {}

    def other() -> None:
        with bpmem.measure(model) as m:
            model(x).sum().backward()
        seen["thread"] = m.saved_activation_bytes

    with bpmem.measure(model) as main:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        model(x).sum().backward()
    assert seen["thread"] == main.saved_activation_bytes == 64 * 256 * 4 * 2


def test_measurements_ended_out_of_order_keep_the_inner_figures() -> None:
    model, x = _mlp()
    with bpmem.measure(model) as reference:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    outer, inner = bpmem.measure(model), bpmem.measure(model)
    outer.__enter__()
    figures = inner.__enter__()
    outer.__exit__(None, None, None)
    model(x).sum().backward()
    inner.__exit__(None, None, None)
    assert (figures.peak_bytes, figures.saved_activation_bytes) == (reference.peak_bytes,
                                                                    reference.saved_activation_bytes)
    assert torch._C._len_torch_dispatch_stack() == 0 and torch._C._len_torch_function_stack() == 0


def test_a_tensor_made_from_a_list_is_new_memory() -> None:
    with bpmem.measure() as m:
        torch.tensor([float(i) for i in range(100_000)])
    assert m.peak_bytes == 100_000 * 4


def test_saved_only_still_names_the_op_that_made_each_tensor() -> None:
    model, x = _mlp()
    with bpmem.measure(model, peak=False) as m:
        model(x).sum().backward()
    assert m.top_saved() == [("0 (input)", 65536), ("1 (relu)", 65536)]
