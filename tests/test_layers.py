"""The package's rooms depend only downward: metrics/ measures images and never imports what trains or samples,
and no two modules import each other (read from the source, lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

from difflab.config import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "src" / "difflab"
# what metrics/ may use besides itself: errors, image conversions, config helpers, logger helpers
METRICS_MAY_IMPORT = {"difflab.errors", "difflab.images", "difflab.config", "difflab.loggers"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def difflab_imports(path: Path) -> set[str]:
    """Every difflab module the file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("difflab")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("difflab"):
            out.add(node.module)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): difflab_imports(p) for p in PACKAGE.rglob("*.py")}


def test_metrics_import_only_downward() -> None:
    bad = {name: sorted(i for i in imports if not i.startswith("difflab.metrics") and i not in METRICS_MAY_IMPORT)
           for name, imports in graph().items() if name.startswith("difflab.metrics")}
    assert not {k: v for k, v in bad.items() if v}, "metrics/ imports training, sampling or entry-point code"


def test_no_import_cycles() -> None:
    g = graph()
    modules = set(g)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in g.get(todo.pop(), ()):
                if nxt in modules and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in modules if m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_checker_sees_a_violation(tmp_path) -> None:
    """The import reader finds lazy imports (the kind the old classifier <-> features cycle hid in)."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from difflab.train import train\n    import difflab.callbacks\n")
    assert difflab_imports(f) == {"difflab.train", "difflab.callbacks"}
