"""The same listeners over the HTTP Events API: signed requests, retries, url_verification, slash commands."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from slack_helpers import CHANNEL, Env, FakeSlack, ScriptedBackend, in_slack, png_bytes, slack_env

from model.engine.contract import RequestFailed


def test_http_events_are_verified_acked_fast_and_answered_once(demo_backend: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with slack_env(tmp_path, backend=demo_backend, mode="http") as env:
            fake, url = env.fake, env.events_url
            assert fake.connections == 0  # no Socket Mode in HTTP mode

            challenge = json.dumps({"type": "url_verification", "challenge": "c-123", "token": "x"})
            status, body, _ = await fake.http_post(url, challenge)
            assert status == 200 and "c-123" in body

            mention = fake.picture_mention(png_bytes())
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
            forged = fake.picture_mention(png_bytes())
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


def _records(caplog: Any, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= level]


def test_http_a_bad_timestamp_is_401_and_one_warning(tmp_path: Path, caplog: Any) -> None:
    """``X-Slack-Request-Timestamp: abc`` (or stale, or missing): refused as unauthenticated, one log line."""

    async def main() -> None:
        async with slack_env(tmp_path, backend=ScriptedBackend("A red square."), mode="http") as env:
            fake, url = env.fake, env.events_url
            mention = fake.picture_mention(png_bytes())
            caplog.clear()
            status, _, _ = await fake.http_event(url, mention, timestamp="abc")
            assert status == 401
            assert not _records(caplog, logging.ERROR)
            warnings = [r.getMessage() for r in _records(caplog, logging.WARNING)]
            assert len(warnings) == 1 and "X-Slack-Request-Timestamp" in warnings[0], warnings
            assert all(r.exc_info is None for r in caplog.records)

            caplog.clear()
            status, _, _ = await fake.http_event(url, mention, timestamp=str(int(time.time()) - 3600))
            assert status == 401 and not _records(caplog, logging.ERROR)  # a replayed old request
            status, _, _ = await fake.http_event(url, mention, timestamp="")
            assert status == 401 and not _records(caplog, logging.ERROR)
            await fake.settle(0.3)
            assert not fake.downloads and not fake.bot_replies(CHANNEL, mention["ts"])

            # The bot is still serving: the same event, signed properly, is answered.
            assert (await fake.http_event(url, mention))[0] == 200
            await env.answered(mention["ts"])

    asyncio.run(main())


def test_http_a_signed_body_that_is_not_json_is_400(tmp_path: Path, caplog: Any) -> None:
    async def main() -> None:
        async with slack_env(tmp_path, backend=ScriptedBackend("A red square."), mode="http") as env:
            fake, url = env.fake, env.events_url
            caplog.clear()
            bodies = ('{"type": "event_callback", "event": ', "{not json", "payload=%7Bnot+json", "[1, 2]")
            for body in bodies:
                kind = "application/x-www-form-urlencoded" if body.startswith("payload=") else "application/json"
                status, _, _ = await fake.http_post(url, body, content_type=kind)
                assert status == 400, body
            assert not _records(caplog, logging.ERROR)
            assert len(_records(caplog, logging.WARNING)) == len(bodies)  # one line each, no traceback
            assert all(r.exc_info is None for r in caplog.records)
            # Unsigned garbage is still 401, not 400: nothing is parsed before the signature holds.
            assert (await fake.http_post(url, "{not json", secret="not-the-secret"))[0] == 401

            mention = fake.picture_mention(png_bytes())
            assert (await fake.http_event(url, mention))[0] == 200
            await env.answered(mention["ts"])

    asyncio.run(main())


def test_http_a_replayed_event_does_not_download_its_picture_again(tmp_path: Path) -> None:
    """Issue 26, item 18: each retry of an answered event fetched its files from Slack before the core
    dropped it.  The core's record of the event (SQL, so also after a restart) is asked first."""

    async def main(env: Env, fake: FakeSlack) -> None:
        mention = fake.picture_mention(png_bytes())
        assert (await fake.http_event(env.events_url, mention, event_id="EvREPLAY"))[0] == 200
        await env.answered(mention["ts"])
        assert len(fake.downloads) == 1

        for retry in (1, 2, 3):  # Slack's retries (X-Slack-Retry-Num), and a duplicate without the header
            assert (await fake.http_event(env.events_url, mention, event_id="EvREPLAY", retry_num=retry))[0] == 200
        assert (await fake.http_event(env.events_url, mention, event_id="EvREPLAY"))[0] == 200
        await fake.wait_for(lambda: env.outcomes().get("duplicate") == 4.0)
        await env.restart()  # a late retry reaching a restarted bot
        assert (await fake.http_event(env.events_url, mention, event_id="EvREPLAY", retry_num=4))[0] == 200
        await fake.wait_for(lambda: env.outcomes().get("duplicate") == 1.0)
        await fake.settle()
        assert len(fake.downloads) == 1
        assert len(fake.bot_replies(CHANNEL, mention["ts"])) == 1

        # A new event with the same picture is downloaded and answered as usual.
        again = fake.user_message(CHANNEL, "And this?", thread_ts=mention["ts"], files=mention["files"])
        assert (await fake.http_event(env.events_url, again, event_id="EvNEW"))[0] == 200
        await env.answered(mention["ts"], answers=2)
        assert len(fake.downloads) == 2

        # An event whose answer failed is not "seen": its retry fetches the picture and is answered.
        env.backend.fail = RequestFailed("the engine broke")
        broken = fake.mention(CHANNEL, "What now?", files=[fake.add_file(png_bytes((0, 0, 200)))])
        assert (await fake.http_event(env.events_url, broken, event_id="EvFAIL"))[0] == 200
        await fake.wait_for(lambda: fake.bot_replies(CHANNEL, broken["ts"]))  # "something went wrong"
        await fake.settle()
        assert [t.status for t in await env.turns(broken["ts"]) if t.role == "assistant"] == ["failed"]
        env.backend.fail = None
        assert (await fake.http_event(env.events_url, broken, event_id="EvFAIL", retry_num=1))[0] == 200
        await env.answered(broken["ts"])
        assert len(fake.downloads) == 4

    in_slack(main, tmp_path, backend=ScriptedBackend("A red square."), mode="http")
