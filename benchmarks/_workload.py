"""The conversation workload both serving benchmarks replay (engine.py, scale.py): torch-free."""

from __future__ import annotations

import io
from typing import Any

TURNS = ("Describe this picture in detail.", "What could I cook with these things?", "Write a short poem about it.")


def image(i: int) -> bytes:
    """A distinct PNG per conversation ``i`` (so image caches see different pictures)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), (20 * (i % 12), 100, 255 - 10 * (i % 20)))
    ImageDraw.Draw(img).ellipse([40 + i % 50, 40, 200, 200], fill=(200, 30 + i % 200, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank); NaN for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def turns(done: list[str], upto: int) -> list[dict[str, Any]]:
    """The thread up to question ``upto``, with the answers ``done`` so far."""
    out: list[dict[str, Any]] = []
    for k in range(upto + 1):
        out.append({"role": "user", "text": TURNS[k], "image": k == 0})
        if k < upto:
            out.append({"role": "assistant", "text": done[k]})
    return out
