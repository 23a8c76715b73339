"""What each probe sees, what it cannot, and that watching does not change the step."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from bpmem.measurement.cell import measure, measure_training_peak, optimizer_state_tensors
from bpmem.measurement.step import make_optimizer, train_step
from bpmem.models.mlp import build, make_batch
from bpmem.predict.estimate import estimate
from bpmem.probes import CudaProbe, LiveTensorProbe, RssProbe, SavedTensorProbe, distinct_storage_bytes
from bpmem.probes.common import storage_key
from bpmem.spec import MLPSpec
from bpmem.strategies.registry import make_step

SMALL = MLPSpec(input_dim=12, hidden_dim=8, output_dim=5, depth=2)


def _ready(spec: MLPSpec, batch: int = 4, optimizer: str = "sgd"):
    model = build(spec)
    x, y = make_batch(spec, batch)
    opt = make_optimizer(make_step(batch_size=batch, optimizer=optimizer), model)
    train_step(spec, model, opt, x, y)  # warm-up
    return model, opt, x, y


def test_saved_probe_counts_a_shared_storage_once_and_skips_parameters() -> None:
    model, opt, x, y = _ready(SMALL)
    with SavedTensorProbe(model) as probe:
        train_step(SMALL, model, opt, x, y, scope=probe.scope)
    s, b = 4, 4
    by_name = {row["name"]: row["saved_bytes"] for row in probe.per_layer()}
    assert by_name["0.Linear"] == b * 12 * s  # the input batch X
    assert by_name["1.ReLU"] == b * 8 * s  # its output, also the next mm's mat1: once
    assert by_name["2.Linear"] == 0  # saved the ReLU output (already counted) and W (a parameter)
    assert by_name["regularizer"] == 0  # pow saves W only
    assert by_name["loss"] == b * 5 * s + b * 8 + s  # log_softmax out, int64 labels, total_weight
    assert probe.saved_activation_bytes == sum(by_name.values())


def test_saved_probe_sees_gelu_input_and_output() -> None:
    spec = SMALL.replace(activation="gelu", depth=1)
    model, opt, x, y = _ready(spec)
    with SavedTensorProbe(model) as probe:
        train_step(spec, model, opt, x, y, scope=probe.scope)
    by_name = {row["name"]: row["saved_bytes"] for row in probe.per_layer()}
    assert by_name["1.GELU"] == 4 * 8 * 4  # z, GELU's input
    assert by_name["2.Linear"] == 4 * 8 * 4  # h, GELU's output, saved by the next mm


def test_saved_probe_counts_a_new_storage_at_a_freed_ones_address() -> None:
    """A storage is known by its address only while it lives: the allocator hands a freed
    storage's address to the next one, which is another storage and counts on its own (the
    probe once kept one entry per address, so the later storage replaced the earlier)."""
    a = torch.randn(64, requires_grad=True)
    keys = []
    with SavedTensorProbe() as probe:
        for _ in range(3):
            h = a.exp()  # exp saves its result; h and its graph die at once
            keys.append(storage_key(h))
            del h
    if len(set(keys)) == 3:
        pytest.skip("the allocator reused no address this time")
    assert probe.saved_activation_bytes == 3 * 64 * 4
    assert probe.per_layer() == [{"name": "outside", "saved_bytes": 3 * 64 * 4}]
    assert probe.peak_retained_bytes == 64 * 4 and probe.retained_bytes == 0


def test_saved_probe_leaves_out_what_a_reentrant_recomputation_saves_in_backward() -> None:
    """Reentrant checkpointing saves only its inputs in the forward (under no_grad) and saves
    again when backward re-runs that forward: freed within the checkpoint's backward, those
    are no activation the forward retains. A checkpointed module and a checkpointed function
    alike; what a create_graph backward saves (H v's) still counts."""
    lin, act = torch.nn.Linear(8, 8), torch.nn.ReLU()
    block = torch.nn.Sequential(lin, act)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorProbe(block) as probe:
        h = x * 2  # a leaf's mul saves the other operand only: a scalar, not a tensor of x
        y = checkpoint(block, h, use_reentrant=True)
        z = checkpoint(lambda t: torch.sigmoid(t) * t, y, use_reentrant=True)
        z.sum().backward()
    by_name = {row["name"]: row["saved_bytes"] for row in probe.per_layer()}
    assert by_name == {"0.Linear": 0, "1.ReLU": 0, "outside": 2 * 4 * 8 * 4}  # h and y, each checkpoint's input
    assert probe.saved_activation_bytes == 2 * 4 * 8 * 4

    w = torch.randn(8, requires_grad=True)
    with SavedTensorProbe() as probe:
        objective = w.pow(3).sum()
        assert probe.saved_activation_bytes == 8 * 4  # pow saves w
        torch.autograd.grad(objective, w, create_graph=True)
        assert probe.saved_activation_bytes > 8 * 4  # its backward, made with a graph, saves too


def test_live_probe_timeline_rises_in_forward_and_falls_in_backward() -> None:
    model, opt, x, y = _ready(SMALL)
    probe = measure_training_peak(SMALL, model, opt, x, y)
    phases = [e.phase for e in probe.timeline]
    forward = [e.live_bytes for e in probe.timeline if e.phase == "forward"]
    assert "forward" in phases and "backward" in phases and phases.index("forward") < phases.index("backward")
    after_zero_grad = [e.live_bytes for e in probe.timeline if e.phase == "zero_grad"][-1]
    assert max(forward) > after_zero_grad
    backward = [e.live_bytes for e in probe.timeline if e.phase == "backward"]
    assert backward[-1] < max(backward)  # saved activations and temporaries released
    params = distinct_storage_bytes(model.parameters())
    grads = distinct_storage_bytes(p.grad for p in model.parameters())
    # What is left when the step ends: params, the new grads and the batch; J died on return.
    assert probe.live_bytes == params + grads + distinct_storage_bytes([x, y])
    assert probe.peak_bytes == estimate(SMALL, make_step(batch_size=4)).peak_bytes


class _NaiveMode(TorchDispatchMode):
    """A dispatch mode that only passes ops through, as a naive live-tensor probe would."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_live_probe_does_not_change_how_autograd_accumulates() -> None:
    """Autograd sums a weight's two gradients (Linear and regulariser) in place unless a
    dispatch mode is active. A naive mode therefore allocates an extra weight-sized buffer
    per layer; the LiveTensorProbe steps aside between autograd nodes, so it does not."""
    model, opt, x, y = _ready(SMALL)
    naive = _NaiveMode()
    with naive:
        opt.zero_grad(set_to_none=True)
        from bpmem.measurement.step import forward_objective

        objective = forward_objective(SMALL, model, x, y)
        naive.ops.append("--backward--")
        objective.backward()
    backward_ops = naive.ops[naive.ops.index("--backward--"):]
    assert backward_ops.count("add") == SMALL.depth + 1  # one out-of-place sum per weight

    probe = measure_training_peak(SMALL, model, opt, x, y)
    backward_ops = [e.op for e in probe.timeline if e.phase == "backward"]
    assert "add" not in backward_ops


def test_live_probe_counts_preexisting_state() -> None:
    model, opt, x, y = _ready(SMALL, optimizer="adam")
    probe = measure_training_peak(SMALL, model, opt, x, y)
    first = probe.timeline[0]
    assert first.by_category["optimizer"] == distinct_storage_bytes(optimizer_state_tensors(opt))
    assert first.by_category["params"] == distinct_storage_bytes(model.parameters())
    assert first.by_category["inputs"] == distinct_storage_bytes([x, y])


def test_live_probe_holds_no_reference_to_freed_tensors() -> None:
    probe = LiveTensorProbe()
    with probe:
        a = torch.ones(1000)
        assert probe.live_bytes == 4000
        del a
    assert probe.live_bytes == 0
    assert probe.peak_bytes == 4000


def test_rss_probe_sees_a_large_allocation() -> None:
    # 96 MiB, written so its pages are resident. Above glibc's largest mmap threshold
    # (32 MiB), so it is fresh memory even after earlier tests freed blocks into the heap.
    with RssProbe() as probe:
        block = torch.ones(96 * 1024 * 1024 // 4)
        del block
    assert probe.samples >= 1
    assert probe.rss_peak_bytes - probe.rss_start_bytes >= 48 * 1024 * 1024


def test_cuda_probe_refuses_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA"):
        with CudaProbe():
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measure_reports_allocator_peaks() -> None:
    spec, step = MLPSpec(), make_step(batch_size=256)
    result = measure(spec, step, device="cuda")
    predicted = estimate(spec, step)
    assert result.saved_activation_bytes == predicted.saved_activation_bytes
    # The allocator rounds every block up to 512 B and holds cuBLAS workspace: never below
    # the live tensor bytes it served.
    assert result.cuda_max_allocated_bytes >= predicted.params_bytes + predicted.saved_activation_bytes
    assert result.cuda_max_reserved_bytes >= result.cuda_max_allocated_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_steps_own_allocator_peak_is_predicted_to_the_byte(optimizer: str) -> None:
    """max_memory_allocated less the workspace the allocator held before the step equals
    the dry run's peak on fake CUDA tensors in 512 B blocks (Adam's CPU step counters left out)."""
    from bpmem.predict.dry_run import predicted_cuda_allocated

    spec, step = MLPSpec(depth=2), make_step(batch_size=256, optimizer=optimizer)
    result = measure(spec, step, device="cuda")
    assert result.cuda_step_allocated_bytes == predicted_cuda_allocated(spec, step, "cuda")
    assert result.cuda_workspace_bytes >= 0


def test_allocator_blocks_count_only_the_named_device() -> None:
    from bpmem.probes.live import allocator_blocks

    for device_type, expected in (("cpu", 1024), ("cuda", 0), (None, 1024)):
        with allocator_blocks(512, device_type), LiveTensorProbe() as probe:
            kept = [torch.ones(3), torch.ones(100)]  # 12 B and 400 B: one 512 B block each
        assert probe.peak_bytes == expected, device_type
        del kept


def test_allocator_trace_agrees_with_the_live_probe_on_the_plain_step() -> None:
    from bpmem.probes import AllocatorTraceProbe

    spec = SMALL.replace(depth=3)
    model, opt, x, y = _ready(spec, batch=8)
    opt.zero_grad(set_to_none=True)
    baseline = distinct_storage_bytes([*model.parameters(), x, y])
    with AllocatorTraceProbe(baseline) as trace:
        train_step(spec, model, opt, x, y)
    live = measure_training_peak(spec, model, opt, x, y)
    assert trace.peak_bytes == live.peak_bytes


def test_live_probe_on_one_device_ignores_the_others() -> None:
    """With ``device``, only that device's storages count (one stage's GPU under model-parallel)."""
    keep = torch.ones(1000)  # 4000 B on the CPU, listed as preexisting
    with LiveTensorProbe({"inputs": [keep]}, device="meta") as meta_only:
        on_meta = torch.empty(256, device="meta")
        on_cpu = torch.empty(512)
    assert meta_only.peak_bytes == 256 * 4
    with LiveTensorProbe({"inputs": [keep]}, device="cpu") as cpu_only:
        on_meta = torch.empty(256, device="meta")
        on_cpu = torch.empty(512)
    assert cpu_only.peak_bytes == 4000 + 512 * 4
    del on_meta, on_cpu


def test_live_probe_reads_storages_resized_in_place() -> None:
    """FSDP2 grows and frees its all-gathered parameters with ``resize_``, which no aten op
    returns; a ``resizable`` storage's size is read after every op instead."""
    gathered = torch.empty(0)
    with LiveTensorProbe(resizable={"gathered_params": [gathered]}) as probe:
        gathered.untyped_storage().resize_(4096)
        scratch = torch.empty(100)  # any op: the resize is seen at the next one
        gathered.untyped_storage().resize_(0)
        del scratch
        torch.empty(0)
    assert probe.peak_bytes == 4096 + 400
    assert probe.resizable_peak_bytes == 4096
    assert probe.peak_by_category == {"gathered_params": 4096, "outside": 400}


def test_a_dry_run_counts_the_storages_of_the_named_device() -> None:
    """Fake tensors keep their storage on "meta": the device filter of the CUDA view must read
    the tensor's device, or a dry run counts nothing but backward's buffers."""
    from bpmem.probes.live import allocator_blocks

    spec, step = MLPSpec(depth=2), make_step(batch_size=64, optimizer="adam")
    with allocator_blocks(512):
        everything = measure(spec, step, fake=True).peak_bytes
    with allocator_blocks(512, "cpu"):
        on_the_cpu = measure(spec, step, fake=True).peak_bytes
    assert on_the_cpu == everything > estimate(spec, step).params_bytes
