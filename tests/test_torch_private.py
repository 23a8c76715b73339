"""Every private torch API bpmem relies on still behaves as bpmem assumes, and no module but
``bpmem/torch_private.py`` reaches one directly.

After a torch upgrade these tests are the audit: each runs its fence for real on CPU, so a
renamed, removed or changed internal fails here first, by name.
"""

from __future__ import annotations

import ast
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from bpmem import torch_private as tp

ROOT = Path(__file__).resolve().parent.parent


# --- storages and views -------------------------------------------------------------------

def test_storage_addresses_agree_and_tell_storages_apart() -> None:
    a, b = torch.zeros(4, 4), torch.zeros(4, 4)
    view = a[1:].t()
    # live.py keys one dict by both readings, so they must be the same number
    assert tp.tensor_storage_address(a) == tp.storage_address(a.untyped_storage())
    assert tp.tensor_storage_address(view) == tp.tensor_storage_address(a)
    assert tp.tensor_storage_address(a) != tp.tensor_storage_address(b)
    # data_ptr() is 0 for every meta tensor; the address is still distinct
    m1, m2 = torch.empty(3, device="meta"), torch.empty(3, device="meta")
    assert tp.storage_address(m1.untyped_storage()) != tp.storage_address(m2.untyped_storage())


def test_view_base_finds_what_a_view_was_taken_from() -> None:
    weight = nn.Parameter(torch.randn(3, 2))
    assert tp.view_base(weight.t()) is weight
    assert tp.view_base(weight) is weight
    plain = torch.randn(2)
    assert tp.view_base(plain) is plain


def test_wrapper_inner_tensors_unwraps_a_traceable_subclass() -> None:
    from torch.testing._internal.two_tensor import TwoTensor

    a, b = torch.randn(2), torch.randn(2)
    assert tp.wrapper_inner_tensors(TwoTensor(a, b)) == [a, b]
    assert tp.wrapper_inner_tensors(torch.randn(2)) is None


def test_tree_leaves_finds_tensors_in_nested_arguments() -> None:
    t1, t2 = torch.randn(1), torch.randn(1)
    leaves = tp.tree_leaves(((t1, 3), {"k": [t2, None]}))
    assert [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)] == [t1, t2]


# --- mode stacks and the autograd engine --------------------------------------------------

class _SeeOps(tp.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_dispatch_mode_sees_aten_ops() -> None:
    with _SeeOps() as mode:
        torch.randn(2).add(1)
    assert "add" in mode.ops


@pytest.mark.parametrize(("stack", "make"), [(tp.DISPATCH_MODES, _SeeOps), (tp.FUNCTION_MODES, TorchFunctionMode)],
                         ids=["dispatch", "function"])
def test_mode_stack_pops_and_pushes_without_exiting_the_mode(stack: tp.ModeStack, make: type) -> None:
    assert stack.top() is None and stack.length() == 0
    outer, inner = make(), make()
    with outer, inner:
        assert stack.length() == 2 and stack.at(0) is outer and stack.top() is inner
        stack.pop()
        assert stack.top() is outer
        stack.push(inner)
        assert stack.top() is inner
    assert stack.length() == 0


def test_running_backward_and_accumulate_grad() -> None:
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    seen: list[bool] = []
    y.register_hook(lambda grad: seen.append(tp.running_backward()))
    y.sum().backward()
    assert seen == [True] and not tp.running_backward()
    accumulate = y.grad_fn.next_functions[0][0]
    assert tp.is_accumulate_grad(accumulate) and not tp.is_accumulate_grad(y.grad_fn)


def test_context_stash_disabled_keeps_backward_from_stashing() -> None:
    def stashed_during_backward() -> bool:
        x = torch.randn(3, requires_grad=True)
        y = x * 2
        seen: list[bool] = []
        y.register_hook(lambda grad: seen.append(torch._C._is_key_in_tls("context")))
        y.sum().backward()
        return seen[0]

    stash = torch._C._stash_obj_in_tls
    assert stashed_during_backward()
    with tp.context_stash_disabled():
        assert not stashed_during_backward()
    assert torch._C._stash_obj_in_tls is stash and stashed_during_backward()


# --- profiler ------------------------------------------------------------------------------

def test_allocator_events_record_allocations_and_frees() -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t = torch.empty(1 << 20, dtype=torch.uint8)
        del t
    events = tp.allocator_events(prof)
    assert any(e.nbytes == 1 << 20 for e in events) and any(e.nbytes == -(1 << 20) for e in events)
    assert all(isinstance(e.start_ns, int) for e in events)


# --- distributed ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gloo_group() -> Iterator[None]:
    """A process group of this one process; DDP needs one to exist."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_bucket_sizes_cover_the_gradients(gloo_group: None) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp(torch.randn(4, 8)).sum().backward()  # DDP rebuilds its buckets after the first step
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = tp.ddp_bucket_sizes(ddp)
    assert sizes and sum(sizes) == param_bytes


def test_distributed_object_types_are_all_found(gloo_group: None) -> None:
    types = tp.distributed_object_types()
    names = {t.__name__ for t in types}
    # a torch upgrade that moves one of these would leave it alive at teardown unnoticed
    assert names == {"DistributedDataParallel", "FSDPModule", "_PipelineStageBase", "_PipelineSchedule", "DTensor"}
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
    assert isinstance(ddp, types)


# --- torch.compile --------------------------------------------------------------------------

def test_partitioner_memory_budget_sets_and_restores_the_budget() -> None:
    import torch._functorch.config as functorch_config

    before = functorch_config.activation_memory_budget
    with tp.partitioner_memory_budget(0.25):
        assert functorch_config.activation_memory_budget == 0.25
    assert functorch_config.activation_memory_budget == before


def test_boxed_takes_its_arguments_as_one_list() -> None:
    add = tp.boxed(lambda a, b: a + b)
    assert add([2, 3]) == 5


def test_reset_compiler_caches_forces_a_recompile() -> None:
    compiles: list[int] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        compiles.append(1)
        return graph.forward

    fn = torch.compile(lambda x: x.sin() + 1, backend=backend)
    x = torch.randn(3)
    fn(x)
    fn(x)
    assert len(compiles) == 1
    tp.reset_compiler_caches()
    fn(x)
    assert len(compiles) == 2


@pytest.mark.slow  # about 3 s: dynamo, AOTAutograd and two partitions
def test_min_cut_backend_saves_less_under_a_smaller_budget() -> None:
    weights = [torch.randn(64, 64, requires_grad=True) for _ in range(4)]
    graphs: list[str] = []

    def compiler(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        graphs.append(graph.__class__.__name__)
        return tp.boxed(graph)

    def mlp(x: torch.Tensor) -> torch.Tensor:
        for w in weights:
            x = torch.relu(x @ w)
        return x

    def saved_bytes(budget: float) -> int:
        tp.reset_compiler_caches()
        compiled = torch.compile(mlp, backend=tp.min_cut_backend(compiler, compiler))
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.untyped_storage().nbytes())
            return t

        with tp.partitioner_memory_budget(budget), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = compiled(torch.randn(32, 64, requires_grad=True))
        out.sum().backward()
        return sum(saved)

    assert saved_bytes(0.0) < saved_bytes(1.0)
    assert len(graphs) == 4  # a forward and a backward graph per budget, each through our compiler
    tp.reset_compiler_caches()


# --- the fence itself -----------------------------------------------------------------------

FENCE = "bpmem/torch_private.py"
# Private attributes of torch objects (tensors, storages, DTensors) that bpmem has used; read
# on any object but ``self``/``cls``, whose underscored names are bpmem's own.
_TORCH_PRIVATE_ATTRIBUTES = {"_base", "_cdata", "_typed_storage", "_local_tensor"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "torch" and any(_private(part) for part in parts[1:])


def _chain(node: ast.expr) -> list[str] | None:
    """``torch._C._foo`` -> ["torch", "_C", "_foo"]; None unless rooted at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def private_torch_uses(source: str) -> list[str]:
    """Each reach into torch internals in ``source``, as "line: what"."""
    tree = ast.parse(source)
    torch_names = {"torch"}  # and whatever ``import torch as ...`` binds
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            torch_names |= {alias.asname for alias in node.names if alias.name == "torch" and alias.asname}
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, f"import {a.name}") for a in node.names if _private_module(a.name)}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _private_module(node.module):
                found.add((node.lineno, f"from {node.module} import"))
            elif node.module.split(".")[0] == "torch":
                found |= {(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                          if _private(a.name)}
        elif isinstance(node, ast.Attribute):
            chain = _chain(node)
            if chain and chain[0] in torch_names and any(_private(part) for part in chain[1:]):
                first = next(i for i, part in enumerate(chain) if i and _private(part))
                found.add((node.lineno, ".".join(["torch", *chain[1:first + 1]])))
            receiver = node.value
            ours = isinstance(receiver, ast.Name) and receiver.id in {"self", "cls"}
            if not ours and (node.attr in _TORCH_PRIVATE_ATTRIBUTES or node.attr.startswith("_get_ddp")):
                found.add((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            target = node.args[0].value
            if name in {"import_module", "__import__"} and isinstance(target, str) and _private_module(target):
                found.add((node.lineno, f"{name}({target!r})"))
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_the_checker_flags_torch_internals_and_nothing_of_bpmems_own() -> None:
    flagged = private_torch_uses(
        "import torch as th\nimport torch._dynamo\nfrom torch._functorch import config\n"
        "from torch.utils._pytree import tree_leaves\nfrom torch import _C\n"
        "th._C._storage_id(x)\ntorch._dynamo.reset()\nt._base\ns._cdata\nddp._get_ddp_logging_data()\n"
        "import_module('torch._inductor.compile_fx')\n")
    assert [entry.split(":")[0] for entry in flagged] == [str(line) for line in range(2, 12)]
    assert private_torch_uses(
        "import torch\nimport bpmem.models.mlp\ntorch.__version__\ntorch.utils.checkpoint.checkpoint\n"
        "self._probe._on_op(x)\nbpmem.model._ACTIVATION_MODULES\n_storage_id_or_none(t)\nself._base\n"
        "x = '''torch._C._docstring'''\nimport_module('torch.distributed.fsdp')\n") == []


def test_only_the_fence_touches_torch_internals() -> None:
    offenders = {}
    for path in sorted([*(ROOT / "bpmem").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        name = path.relative_to(ROOT).as_posix()
        uses = private_torch_uses(path.read_text())
        if uses and name != FENCE:
            offenders[name] = uses
    assert not offenders, f"use bpmem.torch_private instead (add a fence there if none fits): {offenders}"


def test_fake_tensors_have_shapes_and_no_data() -> None:
    from bpmem.torch_private import data_dependent_errors, fake_tensor_mode, is_fake

    with fake_tensor_mode():
        x = torch.randn(1_000_000, 1_000)  # four gigabytes, never allocated
        y = x @ torch.randn(1_000, 3)
        assert is_fake(y) and y.shape == (1_000_000, 3) and y.device.type == "cpu"
        with pytest.raises(data_dependent_errors()):
            torch.nonzero(y)  # how many rows survive depends on the data
    assert not is_fake(torch.zeros(1))
