"""The package's layers: every module imports, and imports only downward, with no cycles.

Layer map (data flows downward; a module may import its own layer and lower ones):

    (package root) -> kernels -> experts -> optim -> models
            -> strategies | evaluation | data -> protect -> adapters -> cli

The package root (``peer_ll/__init__.py``: metadata such as the version) imports
none of its subpackages, so ``import peer_ll`` stays cheap and anything may import it.

Imports are read from the source with ``ast``, including imports inside functions,
so a lazy import counts like any other.
"""

import ast
import importlib
from pathlib import Path

import pytest

import peer_ll

RANK = {
    "kernels": 0,
    "experts": 1,
    "optim": 2,
    "models": 3,
    "strategies": 4,
    "evaluation": 4,
    "data": 4,
    "protect": 5,
    "adapters": 6,
    "cli": 7,
    "__main__": 7,
    "__init__": -1,  # the package root: metadata only
}
AVALANCHE_OK = {"strategies", "evaluation", "data", "protect", "cli"}
ROOT = Path(peer_ll.__file__).parent


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package, found on disk."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _place(module: str) -> str:
    """The layer of a dotted module name of the package."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``name`` imports, at any depth of its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # "from peer_ll import experts" imports the subpackage peer_ll.experts
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_package_root_imports_no_subpackage():
    inside = sorted(t for t in IMPORTS["peer_ll"] if t.startswith("peer_ll."))
    assert not inside, inside


def test_the_map_knows_every_layer():
    assert {_place(m) for m in MODULES} <= set(RANK), sorted({_place(m) for m in MODULES})


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    assert importlib.import_module(name).__name__ == name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_higher_layer(name):
    mine = _place(name)
    upward = sorted(
        target
        for target in IMPORTS[name]
        if target.split(".")[0] == "peer_ll" and RANK[_place(target)] > RANK[mine]
    )
    assert not upward, f"{name} ({mine}) imports higher layers: {upward}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_avalanche_only_where_the_map_allows(name):
    uses = any(t.split(".")[0] == "avalanche" for t in IMPORTS[name])
    assert not uses or _place(name) in AVALANCHE_OK, f"{name} imports avalanche"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for name, targets in IMPORTS.items():
        for target in targets:
            a, b = _place(name), _place(target)
            if target.split(".")[0] == "peer_ll" and a != b and "__init__" not in (a, b):
                graph.setdefault(a, set()).add(b)
    assert _cycle(graph) is None, _cycle(graph)


def test_no_import_cycle_between_modules():
    def owner_of(target):  # a name imported from a package resolves to that package
        while target not in MODULES and "." in target:
            target = target.rsplit(".", 1)[0]
        return target

    graph = {
        name: {owner_of(t) for t in targets if t.split(".")[0] == "peer_ll"} - {name}
        for name, targets in IMPORTS.items()
    }
    assert _cycle(graph) is None, _cycle(graph)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    source = "def f():\n    from peer_ll.cli import main\n    from . import pool\n"
    path = tmp_path / "peer.py"
    path.write_text(source)
    found = _imports("peer_ll.experts.peer", path)
    assert "peer_ll.cli" in found and "peer_ll.experts" in found
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
