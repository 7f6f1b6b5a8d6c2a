"""Bot.toml lines for the tiny demo weights (``model/demo_weights.py``), for the tests that write a config."""

from __future__ import annotations

from typing import Any

from model.demo_weights import DemoWeights

__all__ = ["shape_lines"]


def _inline(table: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in table.items())


def shape_lines(demo: DemoWeights) -> str:
    """The ``[model]`` lines giving the demo weights' shapes (``vision``, ``qformer_dims``): tiny weights load
    only with their own shape, not the real model's defaults."""
    return f"vision = {{ {_inline(demo.vision)} }}\nqformer_dims = {{ {_inline(demo.qformer_dims)} }}\n"
