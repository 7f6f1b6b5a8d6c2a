"""model/minigpt4.py and model/report.py: the report describes the model, the model does not import the report."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[2] / "model"


def _runtime_imports(path: Path) -> set[str]:
    """Modules the file imports when it runs: at any depth, but not under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_minigpt4_and_report_do_not_import_each_other_at_run_time():
    assert "model.minigpt4" not in _runtime_imports(MODEL / "report.py")
    assert "model.report" not in _runtime_imports(MODEL / "minigpt4.py")
