"""The code's shape, checked: no module of ours reaches into another one's private names.

A private name (one leading underscore) is an implementation detail of the module that
defines it. Reading ``obj._name`` where the module never defines ``_name`` itself, or
importing ``_name`` from another module, couples two modules through a detail: give the
name a public spelling instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("edgeinfer", "export", "models", "runtimes", "apps")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own_private_names(tree: ast.AST) -> set[str]:
    """Private names the module defines: functions, classes, class attributes, ``x._name = ...`` targets."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if _private(n)}


def foreign_private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own = _own_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            receiver = node.value
            if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
                continue
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in FOLDERS):
            for alias in node.names:
                if _private(alias.name) and alias.name != "_common":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {alias.name}")
    return sorted(found)


def test_no_module_uses_another_modules_private_names():
    uses = [u for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py")) for u in foreign_private_uses(p)]
    assert not uses, "private names used across modules:\n" + "\n".join(uses)


def test_the_check_sees_a_foreign_private_use(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text("def f(model):\n    return model._search(1)\n\nfrom .x import _helper\n")
    good = tmp_path / "good.py"
    good.write_text("class A:\n    def __init__(self):\n        self._n = 0\n\n    def same(self, other):\n"
                    "        return other._n == self._n\n")
    assert foreign_private_uses(bad) == ["bad.py:2: ._search", "bad.py:4: imports _helper"]
    assert foreign_private_uses(good) == []


MAX_LINES = 500
LONGER_WITH_A_REASON: dict[str, str] = {}  # path -> why it is one module (none today)


def test_no_module_is_over_500_lines_without_a_reason():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
            and str(p.relative_to(ROOT)) not in LONGER_WITH_A_REASON]
    assert not long, "split these modules (or give the reason in LONGER_WITH_A_REASON):\n" + "\n".join(long)
