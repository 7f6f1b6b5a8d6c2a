"""Slack rendering: mrkdwn escaping, splitting long answers, the ``chat.update`` budget, streamed replies.

The first three are pure and unit-tested directly (``tests/slack/test_slack_format.py``);
:class:`ThreadReply` renders the core's reply events into one thread through an ``AsyncWebClient``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import unicodedata
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError, SlackClientError

from bot.core.requests import Delta, Final, ReplyEvent

__all__ = [
    "ThreadReply",
    "TokenBucket",
    "escape_mrkdwn",
    "escaped_len",
    "split_message",
    "strip_mention",
    "unescape_mrkdwn",
]

FENCE = "```"
CLOSE = "\n```"
_SENTENCE = re.compile(r"[.!?。！？]\s")
_JOINERS = {"\u200d", "\ufe0e", "\ufe0f"}  # zero-width joiner, variation selectors
PLACEHOLDER = "_thinking…_"
INTERRUPTED = "_(answer interrupted — the bot is restarting; please ask again)_"
SUFFIX = " …"  # after the text while an answer still streams
PLACEHOLDER_DELAY_S = 0.3  # a redelivery or a quick notice never shows a placeholder
_END, _TIMEOUT = object(), object()

log = logging.getLogger(__name__)


def escape_mrkdwn(text: str) -> str:
    """Slack's three control characters (``&``, ``<``, ``>``): model text must never become a link or mention."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unescape_mrkdwn(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def escaped_len(text: str) -> int:
    """Length of ``text`` once escaped — what Slack counts against its message limit."""
    return len(text) + 4 * text.count("&") + 3 * (text.count("<") + text.count(">"))


def strip_mention(text: str, bot_user_id: str | None) -> str:
    """Drop ``<@BOT>`` / ``<@BOT|name>`` mentions of this bot and Slack's escaping from a user's message."""
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>:?", " ", text)
    return re.sub(r"[ \t]{2,}", " ", unescape_mrkdwn(text)).strip()


# ---------------------------------------------------------------------- splitting


def _unsafe_cut(text: str, i: int) -> bool:
    """Cutting before ``text[i]`` would split a character cluster, an escape-free fence or a ZWJ sequence."""
    if i <= 0 or i >= len(text):
        return False
    c, prev = text[i], text[i - 1]
    if unicodedata.combining(c) or c in _JOINERS or prev == "\u200d":
        return True
    if "\U0001f3fb" <= c <= "\U0001f3ff":  # skin-tone modifier belongs to the emoji before it
        return True
    if "\U0001f1e6" <= c <= "\U0001f1ff" and "\U0001f1e6" <= prev <= "\U0001f1ff":  # flag (pair of regional letters)
        run = 0
        while i - run - 1 >= 0 and "\U0001f1e6" <= text[i - run - 1] <= "\U0001f1ff":
            run += 1
        return run % 2 == 1
    return c == "`" and prev == "`"


def _fit(text: str, start: int, budget: int) -> int:
    """The largest end such that ``text[start:end]`` escaped is at most ``budget`` characters."""
    used, i = 0, start
    while i < len(text):
        c = text[i]
        used += 5 if c == "&" else 4 if c in "<>" else 1
        if used > budget:
            break
        i += 1
    return i


def _break(text: str, start: int, end: int) -> int:
    """Where to cut inside ``text[start:end]``: paragraph, line, sentence, word — else as late as is safe."""
    floor = start + max(1, (end - start) // 2)
    window = text[floor:end]
    candidates = (
        window.rfind("\n\n") + 2 if "\n\n" in window else 0,
        window.rfind("\n") + 1,
        max((m.end() for m in _SENTENCE.finditer(window)), default=0),
        window.rfind(" ") + 1,
    )
    for offset in candidates:
        if offset > 0 and not _unsafe_cut(text, floor + offset):
            return floor + offset
    cut = end
    while cut > start + 1 and _unsafe_cut(text, cut):
        cut -= 1
    return cut


def _fences(body: str, opener: str | None) -> str | None:
    """The fence still open after ``body`` (its opening line, e.g. ```` ```python ````), or ``None``."""
    for line in body.split("\n"):
        count = line.count(FENCE)
        if count % 2 == 0:
            continue
        if opener is not None:
            opener = None
            continue
        stripped = line.strip()
        info = stripped[len(FENCE) :] if stripped.startswith(FENCE) and stripped.count(FENCE) == 1 else ""
        opener = FENCE + info if re.fullmatch(r"[\w+#.-]*", info) else FENCE
    return opener


def split_message(text: str, limit: int) -> list[str]:
    """Split ``text`` into chunks whose *escaped* length is at most ``limit``.

    Cuts prefer paragraph, line, sentence and word boundaries; never split a character cluster
    (combining marks, ZWJ emoji, flags); a code fence open at a cut is closed at the end of the
    chunk and reopened (same info string) at the start of the next, so every chunk renders on
    its own.  Joining the chunks gives back the text, save for whitespace at the cuts and the
    added fence lines.
    """
    if limit < 64:
        raise ValueError("limit must be at least 64 characters")
    text = text.strip()
    chunks: list[str] = []
    opener: str | None = None
    pos = 0
    while pos < len(text):
        head = opener + "\n" if opener else ""
        budget = limit - escaped_len(head) - len(CLOSE)
        end = _fit(text, pos, budget)
        cut = end if end >= len(text) else _break(text, pos, end)
        body = text[pos:cut]
        opener = _fences(body, opener)
        chunk = head + body.rstrip()
        if opener is not None:
            chunk += CLOSE
        if chunk.strip():
            chunks.append(chunk)
        pos = cut
        while pos < len(text) and text[pos] == "\n":
            pos += 1
        if opener is None:
            while pos < len(text) and text[pos] == " ":
                pos += 1
    return chunks


# ---------------------------------------------------------------------- edit budget


class TokenBucket:
    """At most ``per_minute`` acquisitions in any 60-second window, ``burst`` of them back to back.

    A token bucket (capacity ``burst``, refilled at ``per_minute - burst`` a minute) keeps edits
    evenly spaced, and a log of the last minute's acquisitions makes the cap exact.  ``try_acquire``
    never waits and yields to callers blocked in ``acquire`` (final answers go before interim edits).
    """

    def __init__(
        self,
        per_minute: int,
        burst: int = 3,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self.capacity = float(max(1, min(burst, per_minute)))
        self.rate = max(per_minute - self.capacity, 1.0) / 60.0  # burst + refill fit in one minute
        self.clock, self.sleep = clock, sleep
        self.tokens = self.capacity
        self.updated = clock()
        self.log: deque[float] = deque()
        self.waiting = 0
        self._lock = asyncio.Lock()

    def _wait(self) -> float:
        """Seconds until a token may be taken (0 = now)."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        while self.log and self.log[0] <= now - 60.0:
            self.log.popleft()
        wait = 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate
        if len(self.log) >= self.per_minute:
            wait = max(wait, self.log[0] + 60.0 - now)
        return wait

    def _take(self) -> None:
        self.tokens -= 1
        self.log.append(self.clock())

    def try_acquire(self) -> bool:
        if self.waiting or self._wait() > 0:
            return False
        self._take()
        return True

    async def acquire(self) -> None:
        self.waiting += 1
        try:
            async with self._lock:  # FIFO among waiters
                while (wait := self._wait()) > 0:
                    await self.sleep(wait + 1e-6)
                self._take()
        finally:
            self.waiting -= 1


# ---------------------------------------------------------------------- streaming replies


class ThreadReply:
    """One answer in one thread: placeholder → throttled ``chat.update``s → the final message(s).

    The placeholder waits ``PLACEHOLDER_DELAY_S`` for the core's verdict, so a dropped redelivery or a
    quick notice shows none.  Interim edits need a free token from the workspace's bucket and
    ``interval_s`` since this answer's last edit (else the text waits for the next chance); the final
    text waits for a token.  Ephemeral replies remove the placeholder and go to the user alone.
    """

    def __init__(
        self,
        client: Any,
        bucket: TokenBucket,
        channel: str,
        thread: str,
        user: str,
        in_thread: bool,
        *,
        limit: int = 3500,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client, self.bucket, self.limit, self.interval_s = client, bucket, limit, interval_s
        self.clock, self.sleep = clock, sleep
        self.channel, self.thread, self.user, self.in_thread = channel, thread, user, in_thread
        self.ts: list[str] = []  # our messages, in order
        self.shown: list[str] = []  # what each of them shows
        self.last_edit = float("-inf")
        self._get: asyncio.Future[Any] | None = None

    async def run(self, events: AsyncIterator[ReplyEvent]) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        pump = asyncio.ensure_future(self._pump(events, queue))
        text, dirty, finished = "", False, False
        retry_s = 60.0 / self.bucket.per_minute
        try:
            item = await self._next(queue, PLACEHOLDER_DELAY_S)
            if item is _TIMEOUT or isinstance(item, Delta):
                await self._post(PLACEHOLDER)
            while item is not _END:
                if isinstance(item, Delta):
                    text, dirty = text + item.text, True
                elif isinstance(item, Final):
                    await self._finish(item)
                    finished, dirty = True, False
                wait = None
                if dirty:
                    wait = self.last_edit + self.interval_s - self.clock()
                    if wait <= 0:
                        dirty = not await self._interim(text)
                        wait = retry_s if dirty else None
                item = await self._next(queue, wait)
            if not finished:  # a redelivery: the core answered nothing
                await self._delete(0)
        except asyncio.CancelledError:
            if self.ts and not finished:
                with contextlib.suppress(Exception):
                    update = self.client.chat_update(channel=self.channel, ts=self.ts[0], text=INTERRUPTED)
                    await asyncio.wait_for(update, 5)
            raise
        finally:
            if self._get is not None:
                self._get.cancel()
            pump.cancel()  # closes the core's iterator: an unfinished answer is marked interrupted
            await asyncio.gather(pump, return_exceptions=True)

    async def _pump(self, events: AsyncIterator[ReplyEvent], queue: asyncio.Queue[Any]) -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
        finally:
            queue.put_nowait(_END)

    async def _next(self, queue: asyncio.Queue[Any], timeout: float | None) -> Any:
        """The next reply event, or ``_TIMEOUT`` after ``timeout`` seconds (of ``clock``/``sleep``)."""
        if self._get is None:
            self._get = asyncio.ensure_future(queue.get())
        if timeout is None:
            await asyncio.wait({self._get})
        elif not self._get.done():
            timer = asyncio.ensure_future(self.sleep(max(timeout, 0.0)))
            try:
                await asyncio.wait({self._get, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
        if not self._get.done():
            return _TIMEOUT
        item, self._get = self._get.result(), None
        return item

    async def _interim(self, text: str) -> bool:
        # Split like the final text will be (a prefix's cuts are the whole text's), so messages are only added.
        chunks = [escape_mrkdwn(c) for c in split_message(text, self.limit)] or [""]
        tail = "\n…" if chunks[-1].endswith(FENCE) else SUFFIX
        if len(chunks[-1]) + len(tail) <= self.limit:
            chunks[-1] += tail
        return await self._show(chunks, final=False)

    async def _finish(self, final: Final) -> None:
        if final.ephemeral:
            await self._delete(0)
            await self._ephemeral(escape_mrkdwn(final.text))
            return
        text = final.text if final.kind != "error" else f":warning: {final.text}"
        chunks = [escape_mrkdwn(c) for c in split_message(text, self.limit)] or ["(no answer)"]
        await self._show(chunks, final=True)

    async def _show(self, chunks: list[str], final: bool) -> bool:
        """Make our messages show ``chunks``: edit what changed, post what is new, delete what is left over."""
        for i, chunk in enumerate(chunks):
            if i >= len(self.ts):
                if not await self._post(chunk):
                    return False
            elif self.shown[i] != chunk and not await self._update(i, chunk, final):
                return False
        if final:
            await self._delete(len(chunks))
        return True

    async def _update(self, i: int, text: str, final: bool) -> bool:
        if final:
            await self.bucket.acquire()
        elif not self.bucket.try_acquire():
            return False
        if await self._call("chat_update", channel=self.channel, ts=self.ts[i], text=text) is None:
            if not final:
                return False
            await self._delete(i)  # the message is gone or frozen: continue in a new one
            return await self._post(text)
        self.shown[i], self.last_edit = text, self.clock()
        return True

    async def _post(self, text: str) -> bool:
        response = await self._call(
            "chat_postMessage", channel=self.channel, thread_ts=self.thread, text=text, unfurl_links=False,
            unfurl_media=False,
        )  # fmt: skip
        if response is None:
            return False
        self.ts.append(response["ts"])
        self.shown.append(text)
        return True

    async def _ephemeral(self, text: str) -> None:
        thread = {"thread_ts": self.thread} if self.in_thread else {}
        await self._call("chat_postEphemeral", channel=self.channel, user=self.user, text=text, **thread)

    async def _delete(self, start: int) -> None:
        for ts in self.ts[start:]:
            await self._call("chat_delete", channel=self.channel, ts=ts)
        del self.ts[start:], self.shown[start:]

    async def _call(self, method: str, **kwargs: Any) -> Any:
        """One Web API call (429s already retried by the client); ``None`` when it failed, logged."""
        try:
            return await getattr(self.client, method)(**kwargs)
        except SlackApiError as exc:
            log.warning("%s failed in %s: %s", method, self.channel, exc.response.get("error"))
        except (SlackClientError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s failed in %s: %s", method, self.channel, type(exc).__name__)
        return None
