"""Picture checks: messages name the formats really accepted, logs carry no buffer reprs, and decoding runs
off the event loop (issue 26, items 11 and 17)."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.core.config import ImageSettings, Settings
from bot.core.errors import ImageError
from bot.core.images import DECODE_WORKERS, accepted_formats, check_image, check_images
from bot.core.requests import Final, ImageAttachment, Request
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.scripted_backend import ScriptedBackend

BIG = ImageSettings(max_bytes=64 * 2**20, max_pixels=50_000_000)


def encoded(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A 49-megapixel PNG (small on disk, a fraction of a second of CPU to decode)."""
    return encoded(Image.linear_gradient("L").resize((7000, 7000)).convert("RGB"), "PNG", compress_level=1)


def test_messages_list_every_accepted_format_and_logs_name_no_buffer(caplog: pytest.LogCaptureFixture) -> None:
    assert "BMP" in accepted_formats() and "WebP" in accepted_formats()
    bmp = encoded(Image.new("RGB", (8, 8), (1, 2, 3)), "BMP")
    assert check_image(bmp, BIG).mime == "image/bmp"  # accepted, so it must be listed
    caplog.set_level(logging.INFO, logger="bot.core.images")
    with pytest.raises(ImageError) as refused:
        check_image(b"GIF89a not really a picture at all", BIG, name="cat.gif")
    assert f"({accepted_formats()})" in str(refused.value) and "BMP" in str(refused.value)
    tiff = encoded(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(ImageError) as wrong_kind:
        check_image(tiff, BIG, name="scan.tif")
    assert "TIFF" in str(wrong_kind.value) and accepted_formats("and") in str(wrong_kind.value)
    logged = [r.getMessage() for r in caplog.records]
    assert logged and all("BytesIO" not in line and "0x" not in line for line in logged), logged
    assert any("cat.gif" in line and "cannot identify image file" in line for line in logged), logged


def test_decoding_runs_in_the_bounded_pool(big_png: bytes) -> None:
    tiny = encoded(Image.new("RGB", (4, 4)), "PNG")

    async def main() -> list[str]:
        await asyncio.gather(*(check_images([(tiny, "a"), (big_png, "b")], BIG) for _ in range(6)))
        return [t.name for t in threading.enumerate() if t.name.startswith("image-check")]

    names = asyncio.run(main())
    assert 1 <= len(names) <= DECODE_WORKERS  # twelve pictures at once, never more decoders than the pool


def test_the_loop_keeps_answering_while_a_big_picture_is_decoded(tmp_path: Path, big_png: bytes) -> None:
    """A loop-lag probe runs while the service checks a 49-megapixel picture: with the decode on the loop
    the probe stalls for the whole decode; off the loop its longest gap is a small part of it."""
    started = time.perf_counter()
    check_image(big_png, BIG)
    decode_s = time.perf_counter() - started

    async def main() -> tuple[float, list[Any]]:
        db = Database(sqlite_url(tmp_path / "images.db"))
        await db.create_all()
        settings = Settings.model_validate({"images": {"max_bytes": BIG.max_bytes}})
        service = BotService(settings, db, ScriptedBackend())
        gaps: list[float] = []
        stop = asyncio.Event()

        async def probe() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        request = Request("web", "local", "chat", "t-big", "local", "What is it?", (ImageAttachment(big_png),))
        prober = asyncio.create_task(probe())
        await asyncio.sleep(0.02)
        try:
            events = [event async for event in service.handle(request)]
        finally:
            stop.set()
            await prober
            await db.dispose()
        return max(gaps), events

    worst_gap, events = asyncio.run(main())
    assert isinstance(events[-1], Final) and events[-1].kind == "answer", events
    assert worst_gap < decode_s / 3, (worst_gap, decode_s)


def test_front_ends_get_the_accepted_formats_through_the_seam(tmp_path: Path) -> None:
    """``Core.image_limits.formats`` is what :func:`check_image` reads, so a front end's messages and command
    descriptions (which may not import this module) list the same formats as the core's own messages."""
    from bot.core.config import Settings
    from bot.core.frontend_api import ImageLimits
    from bot.core.service import BotService
    from storage import Database, sqlite_url
    from tests.scripted_backend import ScriptedBackend

    db = Database(sqlite_url(tmp_path / "formats.db"))
    limits = BotService(Settings(), db, ScriptedBackend()).image_limits
    asyncio.run(db.dispose())
    assert limits.formats_text() == accepted_formats() and limits.formats_text("and") == accepted_formats("and")
    assert ImageLimits(1, 1, 1, ("PNG",)).formats_text() == "PNG"
    assert ImageLimits(1, 1, 1).formats_text() == "any picture"
