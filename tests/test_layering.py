"""The layering of docs/architecture.md, read from the code: every import of every module under ``src/vlprompt``
(module level, inside functions, under ``TYPE_CHECKING``) goes down the layer table or stays inside its own
package, and no two modules import each other, directly or through others."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

#: Bottom to top. A module may import its own package and any package of a lower layer, nothing else.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("version", "registry", "safe_pickle", "options", "run_layout"),
    ("backbone", "data", "eval"),
    ("prompts",),
    ("methods",),
    ("config",),
    ("core",),
    ("reports",),
    ("runners", "index"),
    ("demo",),
    ("cli",),
    ("vlprompt", "__main__"),
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the source tree (a package is its ``__init__``)."""
    files = {}
    for path in sorted((SRC / "vlprompt").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


MODULES = module_files()


def imported(name: str) -> Iterator[tuple[str, int]]:
    """(imported vlprompt module, line) for every import statement of module ``name``, wherever it stands."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from pkg import mod` imports the submodule; `from mod import obj` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == "vlprompt" or target.startswith("vlprompt."):
                yield target, node.lineno


def package_of(module: str) -> str:
    """The layer-table entry a module belongs to: ``vlprompt.core.trainer`` -> ``core``, ``vlprompt`` -> itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def edges() -> dict[str, set[tuple[str, int]]]:
    return {name: {(t, line) for t, line in imported(name) if t != name} for name in MODULES}


def test_every_package_has_a_layer() -> None:
    unknown = sorted({package_of(m) for m in MODULES} - set(RANK))
    assert not unknown, f"packages missing from the layer table (here and in docs/architecture.md): {unknown}"


def test_every_import_goes_down_the_layers() -> None:
    wrong = []
    for name, targets in edges().items():
        here = package_of(name)
        for target, line in sorted(targets):
            there = package_of(target)
            if there != here and RANK[there] >= RANK[here]:
                wrong.append(f"{MODULES[name].relative_to(SRC)}:{line} imports {target} ({here} may not use {there})")
    assert not wrong, "imports against the layer table:\n" + "\n".join(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_others() -> None:
    graph = {name: {t for t, _ in targets} for name, targets in edges().items()}
    assert cycles(graph) == []


def test_the_checks_catch_a_circle_and_an_upward_import() -> None:
    """The checker itself: a planted circle is found, and the real tree has the edges it is meant to judge."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    seen = edges()
    # function-level and relative-free imports are both read: the trainer uses the checkpoints, the CLI the core
    assert any(t == "vlprompt.core.checkpoint" for t, _ in seen["vlprompt.core.trainer"])
    assert any(package_of(t) == "core" for name in MODULES if package_of(name) == "cli" for t, _ in seen[name])


def test_the_architecture_doc_shows_this_table() -> None:
    """docs/architecture.md's layer table lists the same packages in the same layers."""
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", ARCHITECTURE.read_text(), flags=re.M)
    documented = [tuple(re.findall(r"`([\w.]+?)(?:/|\.py)?`", cells)) for _, cells in rows]
    assert documented == LAYERS
