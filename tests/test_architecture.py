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


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """bpmem modules imported anywhere in ``tree`` (in functions too), but not under
    ``if TYPE_CHECKING:``, which never runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bpmem"):
            for alias in node.names:  # `from bpmem.strategies import registry` imports a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    return {_module_name(path): _imports(ast.parse(path.read_text()), modules) - {_module_name(path)}
            for path in paths}


def test_no_import_cycle_inside_bpmem() -> None:
    graph = _graph()
    done: set[str] = set()

    def walk(module: str, stack: list[str]) -> None:
        if module in stack:
            cycle = stack[stack.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            walk(target, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        walk(module, [])
    assert "bpmem.estimate" in graph and "bpmem.strategies.registry" in graph


def test_the_cycle_walker_finds_a_cycle() -> None:
    """The walker itself must be able to fail: two modules importing each other lazily."""
    a = ast.parse("def f():\n    from bpmem.b import x\n")
    b = ast.parse("from bpmem.a import y\n")
    modules = {"bpmem.a", "bpmem.b"}
    assert _imports(a, modules) == {"bpmem.b"} and _imports(b, modules) == {"bpmem.a"}
    typing_only = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bpmem.b import x\n")
    assert _imports(typing_only, modules) == set()


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
