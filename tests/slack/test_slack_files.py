"""Slack's picture downloads follow the shared policy (adapters/downloads.py): ``[slack] max_image_bytes``
can only lower the core's ``[images] max_bytes`` (issue 22 item 4: it used to raise it)."""

from __future__ import annotations

import asyncio

import aiohttp
from fake_slack import FakeSlack

from adapters.slack.files import SlackFiles
from bot.core.frontend_api import ImageLimits

LIMITS = ImageLimits(max_bytes=4096, max_pixels=10_000, max_per_message=2, formats=("PNG",))


def test_a_slack_cap_above_the_cores_does_not_raise_it() -> None:
    async def main() -> None:
        fake = await FakeSlack().start()
        try:
            async with aiohttp.ClientSession() as http:
                files = SlackFiles(http, fake.bot_token, fake.api_url, lambda: LIMITS, max_bytes=1024 * 1024)
                declared_big = fake.add_file(b"\x89PNG" + bytes(8 * 1024))  # 8 KiB, declared as such
                (refused,) = await files.download([declared_big])
                too_big = "photo.png is larger than 4 KiB, the most I accept; please send a smaller picture."
                assert refused.error == too_big
                assert fake.downloads == []  # refused by its declared size: not a byte fetched
                lying = fake.add_file(b"\x89PNG" + bytes(8 * 1024), size=100)  # the declared size lies
                (stopped,) = await files.download([lying])
                assert stopped.error is not None and "larger than 4 KiB" in stopped.error and stopped.data == b""
                small = await files.download([fake.add_file(b"\x89PNG" + bytes(1000))])
                assert [(p.data[:4], p.error) for p in small] == [(b"\x89PNG", None)]
        finally:
            await fake.close()

    asyncio.run(main())


def test_a_slack_cap_below_the_cores_lowers_it() -> None:
    async def main() -> None:
        fake = await FakeSlack().start()
        try:
            async with aiohttp.ClientSession() as http:
                files = SlackFiles(http, fake.bot_token, fake.api_url, lambda: LIMITS, max_bytes=1024)
                (refused,) = await files.download([fake.add_file(b"\x89PNG" + bytes(2000))])
                assert refused.error is not None and "larger than 1 KiB" in refused.error
        finally:
            await fake.close()

    asyncio.run(main())
