"""The package's layers, read from the source with the standard library's ``ast``: what may import
what (docs/architecture.md, "Where things are")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "dragoman"


def imports_of(path: Path) -> set[str]:
    """Every dragoman module a file imports (at any level, TYPE_CHECKING blocks included)."""
    tree = ast.parse(path.read_text())
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
    return {name for name in found if name == "dragoman" or name.startswith("dragoman.")}


def graph() -> dict[str, set[str]]:
    """Top-level part of the package (``sessions``, ``app``...) -> the parts it imports."""
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        targets = {name.split(".")[1] for name in imports_of(path) if name.count(".") >= 1}
        out.setdefault(part, set()).update(targets - {part})
    return out


def reaches(g: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        here = todo.pop()
        if here == goal:
            return True
        if here not in seen:
            seen.add(here)
            todo += sorted(g.get(here, ()))
    return False


def test_the_session_plane_never_imports_the_app() -> None:
    g = graph()
    assert "app" not in g["sessions"], g["sessions"]
    assert not reaches(g, "sessions", "app")


def test_no_cycle_between_the_packages_layers() -> None:
    g = graph()
    for part, targets in g.items():
        for target in targets:
            assert not reaches(g, target, part) or target in ("config", "errors", "wire", "types", "clock"), (
                f"{part} -> {target} -> ... -> {part}")


def test_pure_cores_do_no_io() -> None:
    g = graph()
    assert g["core"] <= {"errors", "wire", "types"}, g["core"]
    assert g["wire"] <= {"errors"}, g["wire"]
    for path in (PACKAGE / "core").rglob("*.py"):
        text = path.read_text()
        assert "import asyncio" not in text and "import redis" not in text and "time.time(" not in text, path


def test_only_the_store_talks_to_redis() -> None:
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0]
        if part in ("store", "embedded.py", "cli"):
            continue
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {n for n in names if n == "redis" or n.startswith("redis.")}, path
