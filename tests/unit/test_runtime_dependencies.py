"""Every third-party module the library and the services import is a declared dependency.

The image installs pyproject.toml's dependency list only (at requirements.lock's
versions), not the whole lock: an import that only the lock's test or bench tools
happen to provide here would fail inside a container.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from tests.support import REPO


def _imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for root in ("edgeorch", "services"):
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"edgeorch", "services", "__future__"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_a_declared_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_canonical(re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0]) for dep in project["dependencies"]}
    providers = packages_distributions()
    modules = _imported_top_level_modules()
    assert {"torch", "fastapi", "psutil", "cryptography"} <= modules, "the import scan finds nothing"
    undeclared = {
        module: providers.get(module, [])
        for module in sorted(modules)
        if not declared & {_canonical(d) for d in providers.get(module, [])}
    }
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
