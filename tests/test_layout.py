"""The package's layers and sizes, read from its source with ``ast``.

Layers point one way: the optimizer (optimizer, options, functional, checkpoint, sharded,
paged, interop) uses the kernels and the spec; the kernels use the spec, never the optimizer;
the spec (reference, quant, momentum) uses only itself; the budget uses the spec only. Imports
inside functions count too. No import cycles, and every source file in lion8bit/, tests/,
benchmarks/ and examples/ under 500 lines.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "lion8bit"
SPEC = {"lion8bit.reference", "lion8bit.quant", "lion8bit.momentum"}
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """Modules of this package that one ``from ... import ...`` statement loads."""
    if node.level:
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            package = package.rsplit(".", 1)[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    # ``from package import submodule`` depends on the submodule; importing a name defined in
    # ``base`` itself depends on ``base``.
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    names_of_base = len(submodules) < len(node.names) and base in MODULES
    return submodules + ([base] if names_of_base else [])


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            found |= set(_resolve(module, path, node))
    found.discard(module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def _layer(module: str) -> str:
    if module == "lion8bit.__main__":
        return "entry"
    if module in SPEC:
        return "spec"
    if module.startswith("lion8bit.kernels"):
        return "kernels"
    if module.startswith("lion8bit.budget"):
        return "budget"
    return "optimizer"


# layer -> the layers it may import
ALLOWED = {
    "spec": {"spec"},
    "kernels": {"kernels", "spec"},
    "budget": {"budget", "spec"},
    "optimizer": {"optimizer", "kernels", "spec"},
    "entry": {"budget"},  # python -m lion8bit: the budget tool's command line
}


def test_the_graph_was_read():
    assert {"lion8bit.optimizer", "lion8bit.kernels.cpu_lion", "lion8bit.reference"} <= MODULES.keys()
    assert "lion8bit.functional" in GRAPH["lion8bit.optimizer"]
    assert "lion8bit.kernels" in GRAPH["lion8bit.kernels.cpu_lion"]  # from . import ...
    assert "lion8bit.quant" in GRAPH["lion8bit.kernels.cpu_lion"]  # from .. import quant


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_point_one_way(module):
    layer = _layer(module)
    wrong = sorted(other for other in GRAPH[module] if _layer(other) not in ALLOWED[layer])
    assert not wrong, f"{module} ({layer}) imports {wrong}"


def test_a_forbidden_import_would_be_found(tmp_path):
    """The checker itself: a kernels module importing the optimizer is reported."""
    path = PACKAGE / "kernels" / "cpu_lion.py"
    tree = ast.parse("from ..optimizer import Lion\nfrom .. import functional\n")
    found = set()
    for node in ast.walk(tree):
        found |= set(_resolve("lion8bit.kernels.cpu_lion", path, node)) if isinstance(node, ast.ImportFrom) else set()
    assert found == {"lion8bit.optimizer", "lion8bit.functional"}


def test_no_import_cycles():
    state: dict[str, str] = {}
    cycles = []

    def visit(module, trail):
        state[module] = "open"
        for other in sorted(GRAPH[module]):
            if state.get(other) == "open":
                cycles.append(trail[trail.index(other):] + [other])
            elif other not in state:
                visit(other, trail + [other])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


SOURCES = [PACKAGE] + [PACKAGE.parent / folder for folder in ("tests", "benchmarks", "examples")]


@pytest.mark.parametrize(
    "path",
    sorted(p for folder in SOURCES for p in folder.rglob("*") if p.suffix in (".py", ".cpp", ".h")),
    ids=lambda p: str(p.relative_to(PACKAGE.parent)),
)
def test_files_are_under_500_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines < MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines"
