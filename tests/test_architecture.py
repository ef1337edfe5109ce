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


# ---------------------------------------------------------------- the layout (README "Architecture")

MAX_TOP_LEVEL = 16
MAX_FUNCTION_LINES = 80
# Where each module sits, lowest first: a module imports only its own layer and the ones before it. Top-level
# utilities and configs come first, the commands last (rfdetr_fn/__init__.py, the public face, may import
# anything below the commands).
LAYERS = (
    ("rfdetr_fn.errors", "rfdetr_fn.tree", "rfdetr_fn.rng", "rfdetr_fn.config", "rfdetr_fn.presets",
     "rfdetr_fn.compiler", "rfdetr_fn.flags"),
    ("rfdetr_fn.kernels",),
    ("rfdetr_fn.model",),
    ("rfdetr_fn.losses",),
    ("rfdetr_fn.optim",),
    ("rfdetr_fn.io",),
    ("rfdetr_fn.data",),
    ("rfdetr_fn.step",),
    ("rfdetr_fn.eval",),
    ("rfdetr_fn.train",),
    ("rfdetr_fn.research",),
    ("rfdetr_fn.deploy",),
    ("rfdetr_fn",),
    ("rfdetr_fn.fit", "rfdetr_fn.validate", "rfdetr_fn.test", "rfdetr_fn.predict_cli", "rfdetr_fn.average",
     "rfdetr_fn.cli", "rfdetr_fn.__main__"),
)  # fmt: skip


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names if n != "rfdetr_fn") or module in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py LAYERS: place it there")


def test_top_level_holds_at_most_16_modules():
    top = sorted(p.name for p in Path(rfdetr_fn.__file__).parent.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} top-level modules (at most {MAX_TOP_LEVEL}): {top}"


def test_layers_import_downwards_only():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for dep in _imports(name, path, modules):
            if _layer(dep) > _layer(name):
                upward.append(f"{name} -> {dep}")
    assert not upward, "imports from a later layer: " + ", ".join(sorted(upward))


def _long_functions(source: str, limit: int) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{node.name} ({length} lines)")
    return found


def test_long_function_finder_counts_lines():
    body = "\n".join(f"    x{i} = {i}" for i in range(4))
    assert _long_functions(f"def f():\n{body}\n", 4) == ["f (5 lines)"]
    assert _long_functions(f"def f():\n{body}\n", 5) == []


def test_no_function_over_80_lines():
    long = {name: found for name, path in _modules().items() if (found := _long_functions(path.read_text(), 80))}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _foreign_writes(source: str, package_modules: set[str]) -> list[str]:
    """Assignments in `source` whose target lives in another package module (`mod.X = ...`,
    `mod.X.y = ...`, `mod.X[k] = ...`, `setattr(mod, ...)`), where `mod` is a name imported from the package."""
    tree_ = ast.parse(source)
    imported: set[str] = set()
    for node in ast.walk(tree_):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rfdetr_fn"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in package_modules:
                    imported.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            imported.update(a.asname or a.name for a in node.names if a.name in package_modules and a.asname)

    def root(expr: ast.expr) -> str | None:
        while isinstance(expr, ast.Attribute | ast.Subscript):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) else None

    found = []
    for node in ast.walk(tree_):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AugAssign | ast.AnnAssign) else []  # fmt: skip
        for target in targets:
            if isinstance(target, ast.Attribute | ast.Subscript) and root(target) in imported:
                found.append(ast.unparse(target))
        call = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
        if call and node.args and root(node.args[0]) in imported:
            found.append(ast.unparse(node))
    return found


def test_foreign_write_finder_sees_writes():
    mods = {"rfdetr_fn.compiler", "rfdetr_fn.tree"}
    src = (
        "from rfdetr_fn import compiler\nfrom rfdetr_fn import tree as t\ncompiler.SWITCH.regions = False\nt.X[1] = 2\n"
    )
    assert _foreign_writes(src, mods) == ["compiler.SWITCH.regions", "t.X[1]"]
    assert _foreign_writes("from rfdetr_fn import tree\nx = tree.flatten({})\nx.y = 1\n", mods) == []


def test_no_module_writes_another_modules_state():
    """Module-level state is each module's own: no module assigns into another package module's globals."""
    modules = _modules()
    writes = {
        name: found for name, path in modules.items() if (found := _foreign_writes(path.read_text(), set(modules)))
    }
    assert not writes, f"modules writing other modules' state: {writes}"
