"""The package's layout is its architecture (../shared/DESIGN.md): the package root holds packages only, each package
says what lives in it, and imports run one way: no module imports, even lazily, a module that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"specfleet": ROOT / "services" / "specfleet",
            "specfleet_operator": ROOT / "operator" / "specfleet_operator",
            "specfleet_kernels": ROOT / "kernels" / "specfleet_kernels"}
GENERATED = "specfleet.api.v1."  # protoc's stubs import each other as protoc writes them


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of every first-party module."""
    out = {}
    for top, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """First-party modules `name` imports anywhere in its body (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = {name: {t for t in targets if not (name.startswith(GENERATED) and t.startswith(GENERATED))}
             for name, targets in _graph().items()}
    # a package's __init__ re-exporting its own modules is not a cycle between rooms
    graph = {name: {t for t in targets if not (name + ".").startswith(t + ".")} for name, targets in graph.items()}
    assert _cycles(graph) == []


# Each room's floor: a module may import only rooms on lower floors (and its own room).
FLOORS = {
    "specfleet.api": 0, "specfleet.state": 0, "specfleet_kernels": 0,
    "specfleet.training": 0,  # corpora, the model family's names and their loader: nothing of the serving side
    "specfleet.engine": 1,  # pure algorithms and the target runner, no network
    "specfleet.runtime": 2, "specfleet_operator": 2,
    "specfleet.drafter": 3, "specfleet.fusion": 3, "specfleet.verifier": 3, "specfleet.sdk": 3,
    "specfleet.router": 4,  # it speaks the verifier's stream protocol (verifier/queue.py)
    "specfleet.local": 5, "specfleet.bench": 5,
    "specfleet.cli": 6,
    "specfleet.__main__": 7,
}


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "specfleet" else parts[0]


def test_the_package_root_holds_packages_only():
    root = PACKAGES["specfleet"]
    loose = sorted(p.name for p in root.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == [], f"modules in the package root: {loose}; put each in the package it belongs to"
    for package in sorted(p for p in root.iterdir() if (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc, f"{package.name}/__init__.py says nothing of what lives there"
        assert f"specfleet.{package.name}" in FLOORS, f"specfleet.{package.name} has no floor in FLOORS"


def test_imports_run_downward():
    upward = sorted(f"{name} imports {target}" for name, targets in _graph().items() for target in targets
                    if _room(name) != _room(target) and FLOORS[_room(target)] >= FLOORS[_room(name)])
    assert upward == []
