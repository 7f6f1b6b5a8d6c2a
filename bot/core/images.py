"""Checking pictures before they are stored: size, format, pixel count — with a clear message for each."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from bot.core.config import ImageSettings
from bot.core.errors import ImageError

__all__ = ["CheckedImage", "check_image", "format_size"]

log = logging.getLogger(__name__)

SUPPORTED = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}

try:  # HEIC/HEIF from phones, when the maintained decoder is installed
    import pillow_heif

    pillow_heif.register_heif_opener()
    SUPPORTED |= {"HEIF": "image/heif"}
except ImportError:  # pragma: no cover - optional
    pass


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    mime: str
    width: int
    height: int


def format_size(n: int) -> str:
    """Bytes as KiB / MiB for messages to users."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def check_image(data: bytes, settings: ImageSettings, name: str = "the picture") -> CheckedImage:
    """Decode fully (catches truncated files) and enforce the limits; raises :class:`ImageError`."""
    if not data:
        raise ImageError(f"{name} is empty.")
    if len(data) > settings.max_bytes:
        raise ImageError(f"{name} is {format_size(len(data))}; the limit is {format_size(settings.max_bytes)}.")
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise ImageError(f"{name} arrived as a web page, not an image (the download link may need a login).")
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
            width, height = image.size
            if width * height > settings.max_pixels:
                raise ImageError(f"{name} is {width}×{height} pixels; please send a smaller picture.")
            if kind not in SUPPORTED:
                raise ImageError(f"{name} is a {kind or 'unknown'} file; I read JPEG, PNG, GIF and WebP.")
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        log.info("rejected image: %s", exc)
        raise ImageError(f"{name} has far too many pixels; please send a smaller picture.") from None
    except UnidentifiedImageError as exc:
        log.info("rejected image: %s", exc)
        raise ImageError(f"{name} is not an image I can read (JPEG, PNG, GIF or WebP).") from None
    except (OSError, SyntaxError, ValueError) as exc:
        log.info("rejected image: %s", exc)
        raise ImageError(f"{name} seems truncated or corrupt; please send it again.") from None
    return CheckedImage(data, SUPPORTED[kind], width, height)
