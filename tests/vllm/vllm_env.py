"""Where the vLLM tests find the vLLM environment, and what they do without one: fail, never skip.

The README's test command (``./scripts/setup.sh --dev``) creates ``.venv-vllm``, so a missing one is a broken
set-up, not a reason to test less (as a missing PostgreSQL fails the database tests).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("MINIGPT4_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def require_vllm() -> None:
    """Fail the importing test module when there is no vLLM environment."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(
            f"no vLLM environment at {VLLM_PYTHON}: ./scripts/setup.sh --vllm (or --dev) creates .venv-vllm "
            "(or set MINIGPT4_VLLM_PYTHON)",
            pytrace=False,
        )
