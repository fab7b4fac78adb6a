"""The layers stay one-way (issue 12): read from the source with ast, no import executed.

    schemas  <-  events  <-  app (domain <- application <- adapters)  <-  agents  <-  cli
                                                                      <-  reference  <-  cli

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency). Third-party imports are checked where they matter: Faust only in ``agents/``,
nothing but the standard library in ``app/domain/``, no Kafka client in ``app/``. The
product (schemas, events, app, agents) never imports the stand-ins of other teams'
systems (``reference/``), only ``bench`` imports ``cli``, nothing imports ``bench``.
No import cycle.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "events", "app", "agents", "reference", "cli", "bench")

#: Layer of a module: the first prefix that matches (most specific first).
LAYERS: tuple[tuple[str, str], ...] = (
    ("schemas", "schemas"),
    ("events", "events"),
    ("app.domain", "domain"),
    ("app.adapters", "adapters"),
    ("app", "application"),
    ("agents", "agents"),
    ("reference", "reference"),
    ("cli", "cli"),
    ("bench", "bench"),
)

#: The layers each layer may import (itself included).
ALLOWED: dict[str, frozenset[str]] = {
    "schemas": frozenset({"schemas"}),
    "events": frozenset({"events", "schemas"}),
    "domain": frozenset({"domain"}),
    "application": frozenset({"application", "domain", "events", "schemas"}),
    "adapters": frozenset({"adapters", "application", "domain", "events", "schemas"}),
    "agents": frozenset({"agents", "adapters", "application", "domain", "events",
                         "schemas"}),
    # Other teams' systems, stand-ins for development: built on the product's
    # settings, record-failure rule and PostgreSQL helpers, never on its agents.
    "reference": frozenset({"reference", "adapters", "application", "domain", "events",
                            "schemas"}),
    "cli": frozenset({"cli", "agents", "reference", "adapters", "application", "domain",
                      "events", "schemas"}),
    "bench": frozenset({"bench", "cli", "agents", "reference", "adapters", "application",
                        "domain", "events", "schemas"}),
}

#: Third-party top-level names a layer must not import.
FORBIDDEN_THIRD_PARTY: dict[str, frozenset[str]] = {
    "schemas": frozenset({"faust", "mode", "aiokafka", "sqlalchemy", "asyncpg"}),
    "events": frozenset({"faust", "mode", "sqlalchemy", "asyncpg"}),
    "application": frozenset({"faust", "mode", "aiokafka", "aiohttp"}),
    "adapters": frozenset({"faust", "mode", "aiokafka", "aiohttp"}),
    "reference": frozenset({"faust", "mode"}),
    "cli": frozenset({"faust", "mode"}),
}

#: The command side never imports the query side (they share schemas and events only).
#: Module names or packages (a package stands for every module in it).
COMMAND_SIDE = ("app.transfers", "app.saga_telemetry")
QUERY_SIDE = ("app.query_service", "app.query_reconciliation")


def _in(module: str, names: tuple[str, ...]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "results" not in path.relative_to(ROOT).parts:
                found[_module_name(path)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported name) of every import of the module, lazy ones included; a
    ``from X import y`` names ``X.y`` when that is a module of the tree, else ``X``."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                yield node.lineno, candidate if candidate in MODULES else source


def _first_party(name: str) -> str | None:
    """The module of the tree that ``name`` refers to (longest match), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _graph() -> dict[str, dict[str, int]]:
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges: dict[str, int] = {}
        for line, name in _imports(module, path):
            target = _first_party(name)
            if target is not None and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


GRAPH = _graph()


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        assert _layer(module) in ALLOWED


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_one_way(module: str) -> None:
    layer = _layer(module)
    wrong = [f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} "
             f"({_layer(target)})"
             for target, line in GRAPH[module].items()
             if _layer(target) not in ALLOWED[layer]]
    assert not wrong, f"{layer} may import only {sorted(ALLOWED[layer])}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_third_party_imports_stay_in_their_layer(module: str) -> None:
    layer = _layer(module)
    path = MODULES[module]
    stdlib = sys.stdlib_module_names | {"__future__"}
    wrong: list[str] = []
    for line, name in _imports(module, path):
        top = name.split(".")[0]
        if _first_party(name) is not None or top in PACKAGES:
            continue
        if layer == "domain" and top not in stdlib:
            wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} (the domain "
                         f"imports the standard library only)")
        elif top in FORBIDDEN_THIRD_PARTY.get(layer, frozenset()):
            wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "\n".join(dict.fromkeys(wrong))


def test_the_command_side_does_not_import_the_query_side() -> None:
    command_side = [m for m in GRAPH if _in(m, COMMAND_SIDE)]
    assert len(command_side) > len(COMMAND_SIDE)  # the package's modules are seen
    wrong = [f"{m} imports {t}" for m in command_side for t in GRAPH[m]
             if _in(t, QUERY_SIDE)]
    assert not wrong, wrong


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components over every import, lazy ones included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_rules_see_the_tree() -> None:
    """The rules are not vacuous: the tree has modules in every product layer and the
    graph has edges."""
    layers = {_layer(m) for m in MODULES}
    assert {"schemas", "events", "domain", "application", "adapters", "agents",
            "reference", "cli"} <= layers
    assert sum(len(e) for e in GRAPH.values()) > 50
