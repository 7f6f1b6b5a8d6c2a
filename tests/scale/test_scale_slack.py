"""Two Slack Socket Mode connections — two bot processes' front ends, each with its own core and database
pool on one PostgreSQL — receive the same events; each is answered once.

Slack spreads an app's events over its open Socket Mode connections and redelivers an event on another
connection when an ack is late, so with several bot processes the same event id can reach two of them.
The fake Slack (``tests/slack/fake_slack.py``, real bolt/sdk clients on loopback) is extended here to
hold several connections and to send one event through each of them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from adapters.slack import FRONT_END, SlackSettings
from bot.core.config import Settings
from bot.core.frontend_api import FrontEndContext
from bot.core.requests import ThreadRef
from bot.core.service import BotService
from storage import Database
from tests.pg import create_database, create_schema
from tests.scripted_backend import ScriptedBackend
from tests.slack.fake_slack import FakeSlack

CHANNEL = "C0GENERAL"


class ManySocketsSlack(FakeSlack):
    """The fake Slack, holding every Socket Mode connection instead of only the last one."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sockets: list[web.WebSocketResponse] = []

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.sockets.append(ws)
        self._ws = ws
        await ws.send_json({"type": "hello", "num_connections": len(self.sockets),
                            "connection_info": {"app_id": "A0FAKE"}, "debug_info": {"host": "fake"}})  # fmt: skip
        self._connected.set()
        self._notify()
        return await self._take_acks(ws)

    async def close(self) -> None:
        for ws in self.sockets:
            await ws.close()
        self._ws = None
        await super().close()

    async def send_everywhere(self, event: dict[str, Any], event_id: str, first: int = 0) -> list[str]:
        """The same event (one event id) as an envelope on every connection, connection ``first`` first,
        the others as redeliveries."""
        body = self.event_body(event, event_id)
        sent = []
        for i, ws in enumerate(self.sockets[first:] + self.sockets[:first]):
            envelope_id = str(uuid.uuid4())
            self.sent[envelope_id] = self.clock()
            await ws.send_json({"envelope_id": envelope_id, "type": "events_api", "payload": body,
                                "accepts_response_payload": False, "retry_attempt": i,
                                "retry_reason": "timeout" if i else ""})  # fmt: skip
            sent.append(envelope_id)
        return sent


@pytest.fixture
def shared_pg(postgres_url: str) -> str:
    url = create_database(postgres_url, f"scale_slack_{os.getpid()}_{uuid.uuid4().hex[:6]}")
    create_schema(url)
    return url


def test_scale_two_socket_mode_connections_deliver_each_event_once(shared_pg: str, tmp_path: Path) -> None:
    async def main() -> None:
        fake = await ManySocketsSlack().start()
        settings = Settings.model_validate({"generation": {"max_new_tokens": 8}, "render": {"enabled": False}})
        slack = SlackSettings.model_validate({"api_url": fake.api_url, "mode": "socket", "http_port": 0,
                                              "update_interval_s": 0.0, "updates_per_minute": 600})  # fmt: skip
        bots = []
        try:
            for _ in range(2):  # two bot processes: each its own core, database pool and connection
                db = Database(shared_pg)
                backend = ScriptedBackend("A red circle on white.")
                service = BotService(settings, db, backend)
                adapter = FRONT_END.create(service, slack, FrontEndContext())
                adapter.environ = {"SLACK_BOT_TOKEN": fake.bot_token, "SLACK_APP_TOKEN": fake.app_token}
                await adapter.start()
                bots.append((adapter, service, db, backend))
                connected = len(bots)
                await fake.wait_for(lambda n=connected: len(fake.sockets) == n)

            threads = []
            for i in range(6):
                mention = fake.mention(CHANNEL, f"Question {i}: what is in this picture?",
                                       files=[fake.add_file(_png())])  # fmt: skip
                envelopes = await fake.send_everywhere(mention, event_id=f"Ev{i:04d}", first=i % 2)
                threads.append((mention["ts"], envelopes))
            for root, envelopes in threads:
                await fake.wait_for(lambda e=envelopes: all(x in fake.acks for x in e))  # both connections ack
                await fake.wait_for(lambda r=root: fake.bot_replies(CHANNEL, r) and
                                    fake.bot_replies(CHANNEL, r)[-1].edits[-1][1].startswith("A red"))  # fmt: skip
            await fake.settle()
            for root, _ in threads:
                assert len(fake.bot_replies(CHANNEL, root)) == 1, root  # one answer, whichever process gave it
                view = await bots[0][1].thread(ThreadRef("slack", fake.team, CHANNEL, root), turns=True)
                assert [(t.role, t.status) for t in view.turns] == [("user", "done"), ("assistant", "done")]
            assert sum(len(backend.calls) for *_, backend in bots) == 6  # the model ran once per event
        finally:
            for adapter, _service, db, _backend in bots:
                await adapter.stop()
                await db.dispose()
            await fake.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (220, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
