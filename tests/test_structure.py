"""The architecture rules that a linter does not check: short functions (plotting code exempt)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hasb", "analysis", "search", "reports")
MAX_LINES = 60
# figures are long by nature (axes, labels, legends): the guide exempts plotting code
EXEMPT = {"hasb/plots.py"}


def _long_functions(root: Path = ROOT) -> list[str]:
    found = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in EXEMPT:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_LINES:
                        found.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_longer_than_60_lines():
    assert _long_functions() == []


def test_the_rule_can_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "hasb").mkdir()
    (tmp_path / "hasb" / "m.py").write_text(f"def f():\n{body}\n\n\ndef g():\n    return 1\n")
    assert _long_functions(tmp_path) == [f"hasb/m.py:1 f ({MAX_LINES + 1} lines)"]
