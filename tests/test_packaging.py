"""Every package jaxllama imports is declared: a plain ``pip install -e .`` runs every verb, and
what needs more (PyTorch for Meta checkpoints) is an extra whose absence is one line naming it."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# imported only inside the function that needs it, and declared as this extra
OPTIONAL = {"torch": "meta"}


def _imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in the package (lazy imports included)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "jaxllama").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "jaxllama":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _names(project["dependencies"])
    dists = md.packages_distributions()
    missing = []
    for module, where in sorted(_imports().items()):
        provided = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if module in OPTIONAL:
            assert provided & _names(project["optional-dependencies"][OPTIONAL[module]]), module
        elif not provided & base:
            missing.append(f"{module} (imported by {', '.join(sorted(where))}; distribution {sorted(provided)})")
    assert not missing, "undeclared imports:\n" + "\n".join(missing)

