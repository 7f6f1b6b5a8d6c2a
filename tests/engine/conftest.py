"""The engine tests' default model: the tiny demo Vicuna v0 weights (tests/conftest.py builds them once).

Modules that check numbers against the reference (parity, batched prefill) define their own ``m``."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="module")
def m(demo_models: dict[str, Any]) -> Any:
    return demo_models["vicuna0"]
