"""The README and docs/ stay true to the repository: the Layout section names every module, entry point, config group
and benchmark script, and only paths that exist; every relative link resolves; no page speaks of issue numbers.

Layout format (README.md, section "## Layout", its first fenced block): one entry per line that does not start with
whitespace, a path field and a description separated by two or more spaces. The path field is one repository path (a
folder ends with "/"), optionally followed by more names in that path's own folder: "src/difflab/samplers/base.py
ddim.py dpmpp.py" names src/difflab/samplers/{base,ddim,dpmpp}.py; "conf/data/ model/" names conf/data/ and conf/model/.
Indented lines continue the description above them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ISSUE = re.compile(r"\bissue \d", re.IGNORECASE)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def section(text: str, heading: str) -> str:
    """The body of the level-2 section ``heading`` (up to the next level-2 heading)."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def layout_entries() -> list[tuple[int, list[str]]]:
    """(line number in the block, the repository paths named on that line) for each entry of the Layout block."""
    body = section(README.read_text(), "Layout")
    block = re.search(r"^```[^\n]*\n(.*?)^```", body, re.MULTILINE | re.DOTALL)
    assert block, "the Layout section has no fenced block"
    entries = []
    for number, line in enumerate(block.group(1).splitlines(), 1):
        if not line.strip() or line[0].isspace():
            continue  # a continuation of the description above
        field = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        first, *names = field.split(" ")
        folder = first.rstrip("/").rpartition("/")[0]
        entries.append((number, [first, *(f"{folder}/{name}" if folder else name for name in names)]))
    return entries


def listed() -> set[str]:
    """Every path the Layout names, folders with a trailing "/"."""
    return {path for _, paths in layout_entries() for path in paths}


def test_every_path_the_layout_names_exists():
    missing = [f"line {number}: {path}" for number, paths in layout_entries() for path in paths if not (ROOT / path).exists()]
    assert not missing, "the README Layout names paths that do not exist:\n" + "\n".join(missing)


def test_every_path_the_layout_names_is_of_the_right_kind():
    wrong = [path for path in listed() if path.endswith("/") != (ROOT / path).is_dir() and (ROOT / path).exists()]
    assert not wrong, f"folders must end with '/', files must not: {wrong}"


def test_the_layout_names_every_module_entry_point_config_group_and_benchmark_script():
    names = listed()
    wanted = {
        "modules under src/difflab/": [p for p in (ROOT / "src" / "difflab").rglob("*.py") if p.name != "__init__.py"],
        "entry points at the repository root": list(ROOT.glob("*.py")),
        "benchmark scripts in bench/": list((ROOT / "bench").glob("*.py")),
    }
    missing = {kind: sorted(str(p.relative_to(ROOT)) for p in paths if str(p.relative_to(ROOT)) not in names)
               for kind, paths in wanted.items()}
    groups = sorted(f"conf/{p.name}/" for p in (ROOT / "conf").iterdir() if p.is_dir())
    missing["config groups in conf/"] = [g for g in groups if g not in names]
    missing = {kind: paths for kind, paths in missing.items() if paths}
    assert not missing, f"the README Layout leaves out: {missing}"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (lower case, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    slugs = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        heading = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slugs.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return slugs


def links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)  # code is not linked
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with this anchor in {rel(resolved)}")
    assert not broken, f"{rel(page)}: broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_pages_describe_the_software_not_its_issues(page):
    text = page.read_text()
    found = [line.strip() for line in text.splitlines() if ISSUE.search(line) or "Before issue" in line]
    assert not found, f"{rel(page)} names issues:\n" + "\n".join(found)


def test_the_docs_pages_exist_and_are_linked_from_the_readme():
    text = README.read_text()
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    unlinked = [p.name for p in pages if f"docs/{p.name}" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"
