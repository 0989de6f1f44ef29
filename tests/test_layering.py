"""The package's layering, checked on its import graph (read from the source, imports inside functions and under
TYPE_CHECKING included): no import cycles, no private name used across modules (benchmarks included), and the
algorithm modules never reach the drivers, the CLI, the folder format or serving."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "moe_compress"
# the math: what compresses one matrix or gathers one statistic, whatever drives it
ALGORITHMS = ("moe_compress.experts", "moe_compress.fit", "moe_compress.discovery",
              "moe_compress.compression.allocation", "moe_compress.compression.grouping", "moe_compress.compression.budget",
              "moe_compress.compression.fitting", "moe_compress.calibration.grams", "moe_compress.calibration.observe",
              "moe_compress.quantize")
# what drives it, what writes or serves its results, and the commands on top
ABOVE = ("moe_compress.compression.engine", "moe_compress.compression.in_memory",
         "moe_compress.compression.from_folder", "moe_compress.compression.checkpoint_index", "moe_compress.calibration.layers",
         "moe_compress.calibration.offloaded", "moe_compress.calibration.store", "moe_compress.folder",
         "moe_compress.serving", "moe_compress.pipeline", "moe_compress.cli", "moe_compress.distill",
         "moe_compress.evaluate", "moe_compress.parallel")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The package module an import of `name` loads (a name imported from a module counts as that module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path, importer: str) -> list[tuple[str, str | None, int]]:
    """(module, name imported from it or None, line) for every import of a package module in the file, wherever it
    stands in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(resolve(alias.name), None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package
                package = importer.split(".")[: len(importer.split(".")) - node.level + (path.stem == "__init__")]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((resolve(base), alias.name, node.lineno))
    return [(module, name, line) for module, name, line in found if module is not None]


GRAPH = {name: sorted({module for module, _, _ in imports(path, name) if module != name})
         for name, path in MODULES.items()}


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH.get(todo.pop(), []):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_checker_sees_what_it_checks():
    # a check that found nothing to read would pass whatever the code did
    assert len(MODULES) > 40 and "moe_compress.compression.engine" in GRAPH["moe_compress.compression.in_memory"]
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert cycles({"a": ["b"], "b": []}) == []
    lazy = imports(PACKAGE / "__init__.py", "moe_compress")  # the public names, imported under TYPE_CHECKING
    assert ("moe_compress.compression.in_memory", "compress") in [(module, name) for module, name, _ in lazy]


def test_no_import_cycles():
    assert cycles(GRAPH) == []


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithms_never_reach_the_drivers_the_cli_or_the_folder_format(algorithm):
    assert algorithm in MODULES
    above = sorted(m for m in reachable(algorithm) if m.startswith(ABOVE))
    assert above == [], f"{algorithm} imports (directly or through others) {above}"


def private_uses(path: Path, importer: str) -> list[str]:
    """`from <package module> import _name` and `<imported package module>._name`, across modules."""
    tree = ast.parse(path.read_text(), str(path))
    found = [f"{path.name}:{line} imports {name} from {module}" for module, name, line in imports(path, importer)
             if name and name.startswith("_") and not name.startswith("__") and module != importer]
    aliases = {}  # local name -> package module, for attribute access
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({alias.asname or alias.name: resolve(alias.name) for alias in node.names
                            if alias.name.startswith("moe_compress")})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_compress"):
            aliases.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names
                            if f"{node.module}.{alias.name}" in MODULES})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != importer:
                found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_names_across_modules_in_the_package_and_the_benchmarks():
    files = [(path, name) for name, path in MODULES.items()]
    files += [(path, f"benchmarks.{path.stem}") for path in (ROOT / "benchmarks").glob("*.py")]
    assert len(files) > len(MODULES)
    assert [use for path, name in files for use in private_uses(path, name)] == []


def test_test_modules_never_import_each_other():
    # shared helpers live in conftest.py: a test module importing another breaks under --import-mode=importlib
    tests = {path.stem for path in Path(__file__).parent.glob("test_*.py")}
    found = []
    for path in Path(__file__).parent.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name} imports {name}" for name in names if name.split(".")[0] in tests]
    assert len(tests) > 20 and found == []
