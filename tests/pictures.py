"""The one picture helper of the tests: a plain PNG of a colour and size, or any PIL image as PNG bytes.

Deterministic (PIL encodes the same pixels to the same bytes), so a test may compare hashes of what it
sent; the defaults are the small orange picture most front-end tests send.
"""

from __future__ import annotations

import io

from PIL import Image

__all__ = ["encode_png", "png"]


def encode_png(image: Image.Image) -> bytes:
    """``image`` as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png(color: tuple[int, int, int] = (200, 60, 20), size: tuple[int, int] = (64, 48)) -> bytes:
    """A one-colour RGB picture as PNG bytes."""
    return encode_png(Image.new("RGB", size, color))
