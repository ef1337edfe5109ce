"""The package's shape: no import cycle among its modules (lazy imports inside functions count too), and
no module longer than a reader can take in top to bottom."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import rfdetr_fn
import rfdetr_fn.kernels

MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Every module of rfdetr_fn (rfdetr_fn.kernels included) by dotted name -> file."""
    found = {"rfdetr_fn": Path(rfdetr_fn.__file__), "rfdetr_fn.kernels": Path(rfdetr_fn.kernels.__file__)}
    for package in (rfdetr_fn, rfdetr_fn.kernels):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            spec = importlib.util.find_spec(info.name)
            assert spec is not None and spec.origin is not None, info.name
            found[info.name] = Path(spec.origin)
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (`from pkg import submodule` names the
    submodule; importing a submodule is not counted as importing its parent package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in modules else base)
    return {m for m in out if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    modules = _modules()
    assert {"rfdetr_fn.cli", "rfdetr_fn.fit", "rfdetr_fn.flags", "rfdetr_fn.data.coco"} <= set(modules)
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "rfdetr_fn.flags" in graph["rfdetr_fn.fit"]  # the walker sees real edges
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_flags_is_a_leaf():
    """Argument parsing depends on the configs, presets and error classes only, so every command can import it."""
    modules = _modules()
    assert _imports("rfdetr_fn.flags", modules["rfdetr_fn.flags"], modules) <= {
        "rfdetr_fn.config",
        "rfdetr_fn.presets",
        "rfdetr_fn.errors",
    }
    assert _imports("rfdetr_fn.errors", modules["rfdetr_fn.errors"], modules) == set()


def test_no_module_over_600_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
