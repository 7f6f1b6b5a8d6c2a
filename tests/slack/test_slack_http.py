"""The same listeners over the HTTP Events API: signed requests, retries, url_verification, slash commands."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from slack_helpers import CHANNEL, png_bytes, slack_env


def test_http_events_are_verified_acked_fast_and_answered_once(demo_backend: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with slack_env(tmp_path, backend=demo_backend, mode="http") as env:
            fake, url = env.fake, env.events_url
            assert fake.connections == 0  # no Socket Mode in HTTP mode

            challenge = json.dumps({"type": "url_verification", "challenge": "c-123", "token": "x"})
            status, body, _ = await fake.http_post(url, challenge)
            assert status == 200 and "c-123" in body

            mention = fake.mention(CHANNEL, "What is this?", files=[fake.add_file(png_bytes())])
            status, _, seconds = await fake.http_event(url, mention, event_id="EvHTTP1")
            assert status == 200 and seconds < 3.0  # acked before the answer is generated
            turns = await env.answered(mention["ts"])
            assert len(turns) == 2

            # Slack's retry of the same event (X-Slack-Retry-Num: 1): acked, not answered again.
            status, _, seconds = await fake.http_event(url, mention, event_id="EvHTTP1", retry_num=1)
            assert status == 200 and seconds < 3.0
            follow = fake.user_message(CHANNEL, "Tell me more.", thread_ts=mention["ts"])
            assert (await fake.http_event(url, follow))[0] == 200
            await env.answered(mention["ts"], answers=2)
            await fake.settle()
            assert len(fake.bot_replies(CHANNEL, mention["ts"])) == 2
            assert len(await env.turns(mention["ts"])) == 4
            assert env.outcomes() == {"answered": 2.0, "duplicate": 1.0}

            # A forged request (wrong signing secret) is refused and never reaches the bot.
            forged = fake.mention(CHANNEL, "What is this?", files=[fake.add_file(png_bytes())])
            calls = len(fake.calls)
            status, _, _ = await fake.http_event(url, forged, secret="not-the-secret")
            assert status == 401
            await fake.settle(0.3)
            assert fake.calls[calls:] == [] and not fake.bot_replies(CHANNEL, forged["ts"])

            # The slash command over HTTP: 200 at once, the help arrives on the response_url.
            form = urlencode(fake.command_payload("help"))
            status, _, seconds = await fake.http_post(url, form, content_type="application/x-www-form-urlencoded")
            assert status == 200 and seconds < 3.0
            await fake.wait_for(lambda: fake.responses)
            assert fake.responses[0]["response_type"] == "ephemeral" and "`recipe`" in fake.responses[0]["text"]

    asyncio.run(main())
