"""The folder tree is the architecture: bot/ and adapters/ stay free of torch, model/ never imports bot/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_importing_the_core_and_adapters_does_not_load_torch():
    code = (
        "import sys, bot.core.config, bot.cli.main, adapters.terminal\n"
        "heavy = [m for m in ('torch', 'transformers', 'slack_bolt', 'discord') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_model_does_not_import_bot_or_adapters():
    assert not {"bot", "adapters", "storage"} & _imports("model")


def test_bot_has_no_module_level_torch_import():
    for path in (ROOT / "bot").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only; commands import the model lazily
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("torch", "model", "transformers") for n in names), path
