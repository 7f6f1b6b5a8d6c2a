"""What the fake Slack delivers to the bot (``fake_slack.py`` documents the server): Socket Mode envelopes
over the websocket with their acks recorded, and signed HTTP Events API posts.  A mixin of
:class:`fake_slack.FakeSlack`, which holds the state it reads and writes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web
from slack_sdk.signature import SignatureVerifier


class SlackDeliveries:
    """Socket Mode and HTTP Events API deliveries from the state :class:`fake_slack.FakeSlack` keeps."""

    # set in FakeSlack.__init__
    team: str
    bot_user: str
    signing_secret: str
    acks: dict[str, tuple[float, Any]]
    sent: dict[str, float]

    # ------------------------------------------------------------------ Socket Mode

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._ws = ws
        await ws.send_json(
            {
                "type": "hello",
                "num_connections": 1,
                "connection_info": {"app_id": "A0FAKE"},
                "debug_info": {"host": "fake", "approximate_connection_time": 18060},
            }
        )
        self._connected.set()
        return await self._take_acks(ws)

    async def _take_acks(self, ws: web.WebSocketResponse) -> web.WebSocketResponse:
        """Record each envelope's ack (when, and its payload) until the connection closes."""
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(message.data)
                if "envelope_id" in data:
                    self.acks[data["envelope_id"]] = (self.clock(), data.get("payload"))
                    self._notify()
        return ws

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def send_envelope(
        self, kind: str, payload: dict[str, Any], *, retry_attempt: int | None = None, retry_reason: str | None = None
    ) -> str:
        assert self._ws is not None, "no Socket Mode connection"
        envelope_id = str(uuid.uuid4())
        envelope: dict[str, Any] = {
            "envelope_id": envelope_id,
            "type": kind,
            "payload": payload,
            "accepts_response_payload": kind != "events_api",
        }
        if kind == "events_api":
            envelope["retry_attempt"] = retry_attempt or 0
            envelope["retry_reason"] = retry_reason or ""
        self.sent[envelope_id] = self.clock()
        await self._ws.send_json(envelope)
        return envelope_id

    async def send_event(self, event: dict[str, Any], *, event_id: str | None = None, **retry: Any) -> str:
        return await self.send_envelope("events_api", self.event_body(event, event_id), **retry)

    async def wait_ack(self, envelope_id: str, timeout: float = 5.0) -> float:
        """Seconds from sending the envelope to its ack."""
        await self.wait_for(lambda: envelope_id in self.acks, timeout)
        return self.acks[envelope_id][0] - self.sent[envelope_id]

    # ------------------------------------------------------------------ payloads

    def event_body(self, event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
        return {
            "token": "legacy",
            "team_id": self.team,
            "api_app_id": "A0FAKE",
            "event": event,
            "type": "event_callback",
            "event_id": event_id or "Ev" + uuid.uuid4().hex[:12].upper(),
            "event_time": int(time.time()),
            "authorizations": [{"team_id": self.team, "user_id": self.bot_user, "is_bot": True}],
            "is_ext_shared_channel": False,
        }

    # ------------------------------------------------------------------ HTTP Events API

    async def http_post(
        self,
        url: str,
        body: str,
        *,
        content_type: str = "application/json",
        retry_num: int | None = None,
        secret: str | None = None,
        timestamp: str | None = None,
    ) -> tuple[int, str, float]:
        """POST a body signed like Slack (``secret``, ``timestamp`` override the real ones); returns (status,
        text, seconds)."""
        timestamp = str(int(time.time())) if timestamp is None else timestamp
        signature = SignatureVerifier(secret or self.signing_secret).generate_signature(timestamp=timestamp, body=body)
        headers = {"Content-Type": content_type, "X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": signature}
        if retry_num is not None:
            headers |= {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"}
        started = time.monotonic()
        async with aiohttp.ClientSession() as http, http.post(url, data=body.encode(), headers=headers) as response:
            return response.status, await response.text(), time.monotonic() - started

    async def http_event(
        self, url: str, event: dict[str, Any], *, event_id: str | None = None, **kwargs: Any
    ) -> tuple[int, str, float]:
        return await self.http_post(url, json.dumps(self.event_body(event, event_id)), **kwargs)
