"""The layers hold, read from the import graph: the core imports no service, no service imports another,
and the stage engine builds on the model adapters, never the other way round.

Every ``import`` statement of every module is read with :mod:`ast` (also the
ones inside functions, which a module-level scan would miss), resolved to the
module it names, and checked against the rules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names (``from a import b`` gives a and a.b)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(*packages: str) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports, for every module under ``packages``."""
    graph = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[_module_name(path)] = {
                m for m in _imports(path) if m.split(".")[0] in ("edgeorch", "services")
            }
    return graph


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _service_of(module: str) -> str | None:
    """The service a module belongs to (services.<name>...), None for the composition root and the package."""
    parts = module.split(".")
    if parts[0] != "services" or len(parts) < 2 or parts[1] in ("cli", "__main__"):
        return None
    return parts[1]


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a layer rule, as 'importer -> imported: why'."""
    bad = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if _in(module, "edgeorch") and _in(target, "services"):
                bad.append(f"{module} -> {target}: the core imports a service")
            own, other = _service_of(module), _service_of(target)
            if own and other and own != other:
                bad.append(f"{module} -> {target}: a service imports another service")
            if _in(module, "edgeorch.models") and _in(target, "edgeorch.engine"):
                bad.append(f"{module} -> {target}: models import the engine (the engine builds on models)")
    return bad


def test_the_tree_keeps_its_layers() -> None:
    graph = import_graph("edgeorch", "services")
    assert layering_violations(graph) == []
    # engine -> models is the one allowed direction, and it is used (so the rule above is not vacuous).
    assert any(_in(t, "edgeorch.models") for m, ts in graph.items() if _in(m, "edgeorch.engine") for t in ts)


def test_the_graph_sees_function_local_and_relative_imports() -> None:
    # The composition root imports each service's app inside a function: the reader must see those.
    graph = import_graph("services")
    assert {"services.worker.app", "services.orchestrator.app"} <= graph["services.cli"]
    assert _imports(ROOT / "edgeorch" / "engine" / "__init__.py") >= {"edgeorch.engine.lean_llama"}


def test_each_rule_catches_its_violation() -> None:
    graph = {
        "edgeorch.transport.wire": {"services.worker.routes"},
        "services.worker.routes": {
            "services.orchestrator.store",
            "services.worker.app",
            "edgeorch.transport.wire",
        },
        "services.cli": {"services.worker.app", "services.monitor.app"},
        "edgeorch.models.adapter": {"edgeorch.engine.formats"},
        "edgeorch.engine.base": {"edgeorch.models.adapter"},
    }
    assert layering_violations(graph) == [
        "edgeorch.models.adapter -> edgeorch.engine.formats: models import the engine (the engine builds on models)",
        "edgeorch.transport.wire -> services.worker.routes: the core imports a service",
        "services.worker.routes -> services.orchestrator.store: a service imports another service",
    ]
