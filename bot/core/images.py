"""Checking pictures before they are stored: size, format, pixel count — with a clear message for each.

Decoding a large picture takes a second or more of CPU (a 49-megapixel PNG), so :func:`check_images` runs
the checks in a small pool of worker threads (Pillow releases the GIL while it decodes): the event loop
keeps answering other clients and probes meanwhile, and at most :data:`DECODE_WORKERS` pictures are decoded
at once however many arrive, which bounds the memory their pixels take.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from bot.core.config import ImageSettings
from bot.core.errors import ImageError

__all__ = ["DECODE_WORKERS", "CheckedImage", "accepted_formats", "check_image", "check_images", "format_size"]

log = logging.getLogger(__name__)

# Pillow format name -> (MIME type, the name users know it by)
SUPPORTED: dict[str, tuple[str, str]] = {
    "JPEG": ("image/jpeg", "JPEG"),
    "PNG": ("image/png", "PNG"),
    "GIF": ("image/gif", "GIF"),
    "WEBP": ("image/webp", "WebP"),
    "BMP": ("image/bmp", "BMP"),
}

try:  # HEIC/HEIF from phones, when the maintained decoder is installed
    import pillow_heif

    pillow_heif.register_heif_opener()
    SUPPORTED |= {"HEIF": ("image/heif", "HEIC")}
except ImportError:  # pragma: no cover - optional
    pass

DECODE_WORKERS = 2
"""Pictures decoded at the same time (each holds up to ``max_pixels`` × 4 bytes while it is checked)."""

_BUFFER_RE = re.compile(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>")
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    mime: str
    width: int
    height: int


def format_size(n: int) -> str:
    """Bytes as KiB / MiB for messages to users."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def accepted_formats(conjunction: str = "or") -> str:
    """The formats the bot really reads, for messages ("JPEG, PNG, GIF, WebP, BMP or HEIC"): derived from
    :data:`SUPPORTED`, so a message never lists fewer (or more) than are accepted."""
    names = [label for _mime, label in SUPPORTED.values()]
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}" if len(names) > 1 else names[0]


def _reason(exc: BaseException) -> str:
    """Pillow's message for the log, without the ``<_io.BytesIO object at 0x…>`` it names the buffer by."""
    return " ".join(_BUFFER_RE.sub("", str(exc)).split()) or type(exc).__name__


def check_image(data: bytes, settings: ImageSettings, name: str = "the picture") -> CheckedImage:
    """Decode fully (catches truncated files) and enforce the limits; raises :class:`ImageError`.

    CPU-bound and blocking: from async code call :func:`check_images`.
    """
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
                raise ImageError(f"{name} is a {kind or 'unknown'} file; I read {accepted_formats('and')}.")
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        log.info("rejected image %s: %s", name, _reason(exc))
        raise ImageError(f"{name} has far too many pixels; please send a smaller picture.") from None
    except UnidentifiedImageError as exc:
        log.info("rejected image %s: %s", name, _reason(exc))
        raise ImageError(f"{name} is not an image I can read ({accepted_formats()}).") from None
    except (OSError, SyntaxError, ValueError) as exc:
        log.info("rejected image %s: %s", name, _reason(exc))
        raise ImageError(f"{name} seems truncated or corrupt; please send it again.") from None
    return CheckedImage(data, SUPPORTED[kind][0], width, height)


def _decode_pool() -> ThreadPoolExecutor:
    """The shared pool (created on first use, so importing the core starts no threads)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=DECODE_WORKERS, thread_name_prefix="image-check")
        return _pool


async def check_images(images: Sequence[tuple[bytes, str]], settings: ImageSettings) -> list[CheckedImage]:
    """:func:`check_image` for each ``(data, name)``, in order, off the event loop (in the bounded decode
    pool): the first bad picture raises its :class:`ImageError`."""
    loop = asyncio.get_running_loop()
    pool = _decode_pool()
    return [await loop.run_in_executor(pool, check_image, data, settings, name) for data, name in images]
