"""The package surface: lazy exports that resolve, a torch-free engine contract, no user-facing text."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import model
import model.engine

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("package", [model, model.engine], ids=["model", "model.engine"])
def test_every_lazy_export_resolves_to_its_module_s_object(package) -> None:
    for name, module in package._EXPORTS.items():
        assert getattr(package, name) is getattr(importlib.import_module(module), name), name
        assert name in importlib.import_module(module).__all__, f"{module} does not declare {name}"
    assert package.__all__ == sorted(package._EXPORTS)


def test_the_engine_contract_imports_no_heavy_library() -> None:
    code = (
        "import sys, model.engine.contract\n"
        "heavy = [m for m in ('torch', 'PIL', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_model_package_carries_no_user_facing_text() -> None:
    """Errors say what happened; the bot core decides what a person is told."""
    for path in (ROOT / "model").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for phrase in ("user_message", "Sorry", "try again", "I couldn't", "I'm "):
            assert phrase not in text, f"{path.relative_to(ROOT)} contains {phrase!r}"
