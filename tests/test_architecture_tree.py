"""docs/architecture.md's module tree is the tree: every .py file of pipeline_dsl/ and stages/
is named there, and every file and folder it names exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def tree_paths(text: str) -> list[str]:
    """The paths the tree names: two spaces of indent per folder level, then one name or several
    joined by ', ', then (after two spaces or more) what they are."""
    block = text.split("\n## The module tree", 1)[1].split("```", 2)[1]
    paths, folders = [], []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        del folders[depth:]
        for name in names.split(", "):
            paths.append("/".join(folders + [name.rstrip("/")]))
        if names.endswith("/"):
            folders.append(names.rstrip("/"))
    return paths


def source_files() -> set[str]:
    files = [*(ROOT / "pipeline_dsl").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]
    return {f.relative_to(ROOT).as_posix() for f in files
            if "build" not in f.relative_to(ROOT).parts and "__pycache__" not in f.parts}


def test_tree_paths_reads_folders_and_joined_names():
    text = ("\n## The module tree\n\n```\npkg/        the package\n  a.py, b.py   two\n  sub/     one\n"
            "    c.py     deep\n  d.py     back up\n```\n")
    assert tree_paths(text) == ["pkg", "pkg/a.py", "pkg/b.py", "pkg/sub", "pkg/sub/c.py", "pkg/d.py"]


def test_every_module_is_in_the_tree():
    named = set(tree_paths(DOC.read_text(encoding="utf-8")))
    assert sorted(source_files() - named) == []


def test_everything_the_tree_names_exists():
    missing = [p for p in tree_paths(DOC.read_text(encoding="utf-8")) if not (ROOT / p).exists()]
    assert missing == []
