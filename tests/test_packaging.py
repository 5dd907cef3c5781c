"""Dependencies: what src/difflab imports is declared in pyproject.toml (so `pip install -e .` works in another
environment) and pinned in requirements.txt; test and lint tools stay out of the runtime pins."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

import tomllib

from difflab.config import PROJECT_ROOT

DEV_ONLY = {"pytest", "ruff", "diffusers"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def imported_distributions() -> set[str]:
    modules = set()
    for path in (PROJECT_ROOT / "src" / "difflab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"difflab", "__future__"}
    dists = packages_distributions()
    return {_name(dists[m][0]) for m in third_party}


def test_every_imported_package_is_declared_and_pinned():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]} | {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    pinned = {_name(line) for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    used = imported_distributions()
    assert used - declared == set(), "imported by src/difflab but not in pyproject.toml"
    assert used - pinned == set(), "imported by src/difflab but not pinned in requirements.txt"
    assert not used & DEV_ONLY and not pinned & DEV_ONLY  # test tools are requirements-dev.txt's


def test_dev_requirements_add_the_test_tools_to_the_runtime_pins():
    lines = [line.strip() for line in (PROJECT_ROOT / "requirements-dev.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "-r requirements.txt" in lines and DEV_ONLY <= {_name(line) for line in lines}
