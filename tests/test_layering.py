"""The folder tree is the architecture: adapters → core → model, storage beside the core, the entry layer on top.

Every import is checked, also those inside functions (lazy imports are still dependencies):

=================  ======================================================================
layer              may import (of this project)
=================  ======================================================================
``bot/cli``        everything: it is the composition root and the operator's commands
``bot/core``       ``bot.core``, ``storage``, and of the model only the torch-free ``model.engine.contract``
                   and ``model.settings``
``adapters``       ``bot.core`` and ``adapters`` — never ``storage``, ``model`` or ``bot.cli``
``storage``        ``storage`` only
``model``          ``model`` only
=================  ======================================================================
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("bot", "adapters", "model", "storage", "migrations")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file, at any depth."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; use absolute imports")
        elif isinstance(node, ast.Call) and _literal_import(node):
            found.append((node.lineno, node.args[0].value))  # type: ignore[attr-defined]
    return found


def _literal_import(node: ast.Call) -> bool:
    """``importlib.import_module("x.y")`` / ``__import__("x")`` with a literal name."""
    name = getattr(node.func, "attr", getattr(node.func, "id", ""))
    first = node.args[0] if node.args else None
    return name in ("import_module", "__import__") and isinstance(first, ast.Constant) and isinstance(first.value, str)


def _violations(package: str, allowed: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top not in PROJECT:
                continue
            if not any(module == a or module.startswith(a + ".") for a in allowed):
                # `from model.engine import api` style: the parent package itself is fine when the name is allowed
                if any(a.startswith(module + ".") for a in allowed):
                    continue
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("bot/core", ("bot.core", "storage", "model.engine.contract", "model.settings")),
        ("adapters", ("bot.core", "adapters")),
        ("storage", ("storage",)),
        ("model", ("model",)),
    ],
    ids=["core", "adapters", "storage", "model"],
)
def test_each_layer_imports_only_what_it_may(package: str, allowed: tuple[str, ...]) -> None:
    assert _violations(package, allowed) == []


def test_the_checker_sees_lazy_and_dotted_imports(tmp_path: Path) -> None:
    """Not vacuous: an import inside a function, and an import of a forbidden submodule, are both caught."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from storage import Database\n    import model.loader\n")
    modules = [m for _, m in _imports(sample)]
    assert "storage.Database" in modules and "model.loader" in modules


def test_adapters_use_only_the_core_protocol() -> None:
    """No reaching through the core into its database or backend (``service.db`` …)."""
    private = {"db", "_db", "backend", "_backend", "_presets", "_quotas", "_access"}
    bad = []
    for path in sorted((ROOT / "adapters").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr}")
    assert bad == []


def test_the_core_names_no_platform_or_backend() -> None:
    """Front ends and backends are found through the registry: the core's code never names one."""
    names = ("slack", "discord", "adapters.web", "adapters.terminal", "EngineBackend", "bot.cli")
    bad = []
    for path in sorted((ROOT / "bot" / "core").rglob("*.py")):
        code = path.read_text()
        tree = ast.parse(code)
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                      and n.body and isinstance(n.body[0], ast.Expr)}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n!r}" for n in names if n in node.value.lower()]
            if isinstance(node, ast.Name | ast.Attribute):
                ident = node.id if isinstance(node, ast.Name) else node.attr
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} {ident}" for n in names if n.lower() == ident.lower()]
    assert bad == []


def test_importing_the_core_and_the_light_front_ends_loads_no_torch() -> None:
    modules = sorted(
        ".".join(part for part in p.relative_to(ROOT).with_suffix("").parts if part != "__init__")
        for p in [
            *(ROOT / "bot" / "core").glob("*.py"),
            *(ROOT / "adapters" / "web").glob("*.py"),
            ROOT / "adapters" / "terminal.py",
        ]
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import bot.cli.main\n"
        "heavy = [m for m in ('torch', 'transformers', 'slack_bolt', 'discord') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
