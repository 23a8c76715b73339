"""The structure the code promises: no import cycle, modules of one concept, a registry that
is the only place strategy names are compared, and an estimate that never loads torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from bpmem.strategies import registry

PACKAGE = Path(__file__).resolve().parents[1] / "bpmem"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """bpmem modules imported anywhere in ``tree``: in functions too, and under ``if
    TYPE_CHECKING:``, since an annotation that names a module depends on it as much as a call."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bpmem"):
            if node.module == "bpmem" and [alias.name for alias in node.names] == ["__version__"]:
                continue  # the version string: bpmem/__init__ defines it and imports nothing at import time
            for alias in node.names:  # `from bpmem.strategies import registry` imports a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    return {_module_name(path): _imports(ast.parse(path.read_text()), modules) - {_module_name(path)}
            for path in paths}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated), or None."""
    done: set[str] = set()

    def walk(module: str, stack: list[str]) -> list[str] | None:
        if module in stack:
            return stack[stack.index(module):] + [module]
        if module in done:
            return None
        for target in sorted(graph.get(module, ())):
            if found := walk(target, [*stack, module]):
                return found
        done.add(module)
        return None

    for module in sorted(graph):
        if found := walk(module, []):
            return found
    return None


def test_no_import_cycle_inside_bpmem() -> None:
    graph = _graph()
    assert "bpmem.predict.estimate" in graph and "bpmem.strategies.registry" in graph
    assert _cycle(graph) is None, "import cycle: " + " -> ".join(_cycle(graph) or [])


def test_the_cycle_walker_finds_a_cycle() -> None:
    """The walker itself must be able to fail: two modules importing each other lazily, and
    two whose cycle runs through ``if TYPE_CHECKING:``."""
    modules = {"bpmem.a", "bpmem.b"}
    lazy = {"bpmem.a": _imports(ast.parse("def f():\n    from bpmem.b import x\n"), modules),
            "bpmem.b": _imports(ast.parse("from bpmem.a import y\n"), modules)}
    assert _cycle(lazy) == ["bpmem.a", "bpmem.b", "bpmem.a"]
    typing_only = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bpmem.b import x\n")
    through_types = {"bpmem.a": _imports(typing_only, modules), "bpmem.b": {"bpmem.a"}}
    assert _cycle(through_types) == ["bpmem.a", "bpmem.b", "bpmem.a"]


# The layers, from the entry points down to the shared vocabulary. A module may import its own
# layer and any layer below it, never one above. The data flows config -> model -> strategy ->
# probes -> figures -> rows -> CSV -> report; the imports point down this table.
LAYERS: dict[str, int] = {
    "entry": 8,  # bpmem (the public API), __main__, cli, plugin, worker
    "sweep": 7, "report": 7,  # running a config; drawing results.csv
    "results": 6,  # results.csv, its checks and merges
    "predict": 5,  # estimate, dry runs, fit: the measurement's step on fake tensors
    "strategies": 4,  # the strategies and their runtimes, which run the measurement's step
    "measurement": 3,  # the step, one cell measured, timing
    "probes": 2, "models": 2,  # what is counted; what is run
    "analytic": 1, "cuda_allocator": 1,  # the arithmetic of one step; PyTorch's CUDA allocator, modelled
    "vocabulary": 0,  # spec, figures, units, validation, torch_private: imported by all
}
VOCABULARY = ("spec", "figures", "units", "validation", "torch_private")


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__", "cli", "plugin", "worker"):
        return "entry"
    return "vocabulary" if parts[1] in VOCABULARY else parts[1]


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
            for module, targets in sorted(graph.items()) for target in sorted(targets)
            if LAYERS[_layer(target)] > LAYERS[_layer(module)]]


def test_every_module_is_in_a_layer_and_no_import_points_up() -> None:
    graph = _graph()
    assert {_layer(module) for module in graph} == set(LAYERS)  # every folder is a named layer
    assert _upward(graph) == []


def test_the_layer_check_finds_an_upward_import() -> None:
    graph = _graph()
    planted = {**graph, "bpmem.probes.saved": graph["bpmem.probes.saved"] | {"bpmem.report.build"}}
    assert _upward(planted) == ["bpmem.probes.saved (probes) imports bpmem.report.build (report)"]


def test_at_most_ten_modules_at_the_top() -> None:
    top = sorted(path.stem for path in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top


def test_no_module_is_over_400_lines() -> None:
    sizes = {path.relative_to(PACKAGE.parent).as_posix(): len(path.read_text().splitlines())
             for path in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= MAX_LINES, {k: v for k, v in sizes.items() if v > MAX_LINES}


def test_strategy_names_are_compared_only_in_their_own_modules() -> None:
    """Outside bpmem/strategies, no code spells a strategy's name as a string (the report's
    prose and the default sweep's TOML text aside, which are documents, not comparisons)."""
    names = set(registry.STRATEGIES) - {registry.PLAIN}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "strategies":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                # "none" is also a loss and a default: it counts where the comparison is about a strategy
                spelled = names | ({registry.PLAIN} if "strateg" in ast.unparse(node) else set())
                for operand in [node.left, *node.comparators]:
                    if isinstance(operand, ast.Constant) and operand.value in spelled:
                        offenders.append(f"{path.name}:{node.lineno} compares {operand.value!r}")
                    if isinstance(operand, (ast.Tuple, ast.List, ast.Set)):
                        offenders += [f"{path.name}:{node.lineno} compares {e.value!r}" for e in operand.elts
                                      if isinstance(e, ast.Constant) and e.value in names]
    assert offenders == []


def test_estimate_of_every_arithmetic_strategy_never_imports_torch() -> None:
    """``bpmem estimate --arithmetic`` answers from arithmetic: for every strategy whose
    prediction needs no torch (all but compile-budget), and the plain step in every mode, torch
    stays unloaded. (Without --arithmetic a dry run gives the exact peak where the arithmetic's
    is an upper estimate, and that imports torch.)"""
    arithmetic = [name for name, cls in registry.REGISTRY.items() if cls.predicts_by_arithmetic]
    assert "compile-budget" not in arithmetic and len(arithmetic) == len(registry.STRATEGIES) - 1
    calls = [["estimate", "--arithmetic", "--strategy", name, "--depth", "8", "--batch-size", "8", "--json"]
             for name in arithmetic]
    calls += [["estimate", "--arithmetic", "--mode", mode, "--json"] for mode in ("inference", "hvp")]
    script = ("import contextlib, io, json, sys\nfrom bpmem.cli import main\ncodes = []\n"
              f"for argv in {calls!r}:\n"
              "    with contextlib.redirect_stdout(io.StringIO()):\n"
              "        codes.append(main(argv))\n"
              "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"codes": [0] * len(calls), "torch": False}
