"""Streaming an answer into a chat platform that edits messages in place — shared by every such front end.

Platform-neutral: a front end supplies its message calls (:class:`EditableMessages`: post, update, delete,
post to the asker alone) and its text rules (:class:`ReplyFormat`: message limit, what a character costs
once escaped, the escape itself, the placeholder and warning texts).  This module gives it

* :func:`split_message` — long text in chunks of at most ``limit`` rendered characters, cut at paragraph,
  line, sentence or word boundaries, never inside a character cluster, with code fences closed and
  reopened at the cuts;
* :class:`TokenBucket` — an edit budget (Slack's ``chat.update`` per workspace, Discord's per channel);
* :class:`StreamedReply` — the core's reply events (``Delta`` … ``Final``) → placeholder, throttled edits,
  the final message(s).

Slack uses it with ``limit=3500`` and ``cost=escaped_len`` (``&``, ``<``, ``>`` become entities); Discord
with ``limit=2000`` and plain ``len``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import unicodedata
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from bot.core.grounding import bold_spans
from bot.core.requests import Delta, Final, ReplyEvent, ReplyFile

__all__ = [
    "INTERRUPTED",
    "PLACEHOLDER",
    "PLACEHOLDER_DELAY_S",
    "SUFFIX",
    "EditableMessages",
    "InFlight",
    "ReplyFormat",
    "StreamedReply",
    "TokenBucket",
    "split_message",
]

FENCE = "```"
CLOSE = "\n```"
MIN_LIMIT = 64
_SENTENCE = re.compile(r"[.!?。！？]\s")
_JOINERS = {"\u200d", "\ufe0e", "\ufe0f"}  # zero-width joiner, variation selectors
PLACEHOLDER = "_thinking…_"
INTERRUPTED = "_(answer interrupted — the bot is restarting; please ask again)_"
SUFFIX = " …"  # after the text while an answer still streams
PLACEHOLDER_DELAY_S = 0.3  # a redelivery or a quick notice never shows a placeholder
_END, _TIMEOUT = object(), object()


# ---------------------------------------------------------------------- splitting


def _unsafe_cut(text: str, i: int) -> bool:
    """Cutting before ``text[i]`` would split a character cluster, a fence's backticks or a ZWJ sequence."""
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


def _fit(text: str, start: int, budget: int, cost: Callable[[str], int]) -> int:
    """The largest end such that ``cost(text[start:end])`` is at most ``budget``."""
    if cost is len:
        return min(len(text), start + max(budget, 0))
    used, i = 0, start
    while i < len(text):
        used += cost(text[i])
        if used > budget:
            break
        i += 1
    return i


def _bold(text: str) -> list[tuple[int, int]]:
    """Where the ``**phrase**`` spans are (markers included): a cut inside one would leave each message an
    unmatched ``**`` (Slack's ``*`` once converted) and the phrase not bold."""
    spans, at = [], 0
    for piece, bold in bold_spans(text):
        width = len(piece) + 4 if bold else len(piece)
        if bold:
            spans.append((at, at + width))
        at += width
    return spans


def _break(text: str, start: int, end: int, bold: Sequence[tuple[int, int]] = ()) -> int:
    """Where to cut inside ``text[start:end]``: paragraph, line, sentence, word — else as late as is safe;
    outside ``bold`` spans where a cut outside them exists (a phrase longer than a message is cut anyway)."""
    floor = start + max(1, (end - start) // 2)
    window = text[floor:end]
    candidates = (
        window.rfind("\n\n") + 2 if "\n\n" in window else 0,
        window.rfind("\n") + 1,
        max((m.end() for m in _SENTENCE.finditer(window)), default=0),
        window.rfind(" ") + 1,
    )
    for avoid in (bold, ()) if bold else ((),):
        for offset in candidates:
            if offset > 0 and not _unsafe_cut(text, floor + offset) and not _inside(avoid, floor + offset):
                return floor + offset
        cut = end
        while cut > start + 1 and (_unsafe_cut(text, cut) or _inside(avoid, cut)):
            cut -= 1
        if not _inside(avoid, cut):
            return cut
    return cut


def _inside(spans: Sequence[tuple[int, int]], i: int) -> bool:
    return any(a < i < b for a, b in spans)


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


def split_message(text: str, limit: int, cost: Callable[[str], int] = len) -> list[str]:
    """Split ``text`` into chunks whose rendered length ``cost(chunk)`` is at most ``limit``.

    ``cost`` is what the platform counts against its limit, and must add up character by character
    (``cost(a + b) == cost(a) + cost(b)``): plain ``len`` for Discord, Slack's escaped length (``&`` is
    five characters, ``<`` and ``>`` four).  Cuts prefer paragraph, line, sentence and word boundaries;
    never split a character cluster (combining marks, ZWJ emoji, flags, skin tones); a code fence open at
    a cut is closed at the end of the chunk and reopened (same info string) at the start of the next, so
    every chunk renders on its own.  Joining the chunks gives back the text, save for whitespace at the
    cuts and the added fence lines.  Empty or blank text gives no chunks.
    """
    if limit < MIN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_LIMIT} characters")
    text = text.strip()
    chunks: list[str] = []
    opener: str | None = None
    pos = 0
    bold = _bold(text)
    while pos < len(text):
        head = opener + "\n" if opener else ""
        budget = limit - cost(head) - cost(CLOSE)
        end = _fit(text, pos, budget, cost)
        cut = end if end >= len(text) else _break(text, pos, end, bold)
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


@runtime_checkable
class EditableMessages(Protocol):
    """The messages of one reply on one platform (e.g. in one Slack thread or Discord channel).

    Texts arrive rendered (escaped, at most the format's ``limit``).  A call that fails — the platform
    refused it, the message is gone, the network failed — is logged by the implementation and reported
    as ``None`` / ``False``; only cancellation propagates.  Rate limits are waited out inside.
    """

    async def post(self, text: str) -> str | None:
        """A new message in the reply's place (thread, channel); its id, or ``None`` when it failed."""
        ...

    async def update(self, message_id: str, text: str) -> bool:
        """Replace the text of one of our messages."""
        ...

    async def delete(self, message_id: str) -> bool: ...

    async def post_ephemeral(self, text: str) -> bool:
        """A message only the asker sees (quota, access and bad-input notices)."""
        ...

    async def upload(self, files: Sequence[ReplyFile]) -> str | None:
        """Post the reply's files in its place; ``None`` when done, else a one-line plain note for the asker
        (e.g. "this app lacks the files:write permission"), which is posted instead."""
        ...


def _same(text: str) -> str:
    return text


@dataclass(frozen=True)
class ReplyFormat:
    """A platform's text rules for streamed replies.

    ``limit``: the most rendered characters in one message; ``cost``: rendered length of a text (additive,
    see :func:`split_message`); ``escape``: plain text → the platform's markup, ``len(escape(t)) ==
    cost(t)``.  ``placeholder`` and ``interrupted`` (shown when the bot stops mid-answer) are already in
    the platform's markup; ``warning`` (put before error texts) and ``empty`` (an answer without text) are
    plain text, escaped with the answer.
    """

    limit: int = 2000
    cost: Callable[[str], int] = len
    escape: Callable[[str], str] = _same
    placeholder: str = PLACEHOLDER
    interrupted: str = INTERRUPTED
    warning: str = "⚠️ "
    empty: str = "(no answer)"
    suffix: str = SUFFIX


class StreamedReply:
    """One answer: placeholder → throttled edits → the final message(s), over :class:`EditableMessages`.

    The placeholder waits ``placeholder_delay_s`` for the core's verdict, so a dropped redelivery or a quick
    notice shows none.  Interim edits need a free token from ``bucket`` (shared by every answer streaming
    under the same platform budget) and ``interval_s`` since this answer's last edit, else the text waits
    for the next chance; the final text waits for a token.  A long answer continues in further messages
    (split like :func:`split_message`, so a prefix's cuts are the whole text's and messages are only
    added).  Ephemeral replies remove the placeholder and go to the asker alone.  Cancelled mid-answer
    (shutdown), the first message shows ``fmt.interrupted`` and the core's iterator is closed.
    """

    def __init__(
        self,
        messages: EditableMessages,
        bucket: TokenBucket,
        fmt: ReplyFormat,
        *,
        interval_s: float = 1.0,
        placeholder_delay_s: float = PLACEHOLDER_DELAY_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.messages, self.bucket, self.fmt, self.interval_s = messages, bucket, fmt, interval_s
        self.placeholder_delay_s, self.clock, self.sleep = placeholder_delay_s, clock, sleep
        self.message_ids: list[str] = []  # our messages, in order
        self.shown: list[str] = []  # what each of them shows
        self.last_edit = float("-inf")
        self._get: asyncio.Future[Any] | None = None

    async def run(self, events: AsyncIterator[ReplyEvent]) -> None:
        """Render ``events`` until the core's iterator ends."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        pump = asyncio.ensure_future(self._pump(events, queue))
        text, dirty, finished = "", False, False
        retry_s = 60.0 / self.bucket.per_minute
        try:
            item = await self._next(queue, self.placeholder_delay_s)
            if item is _TIMEOUT or isinstance(item, Delta):
                await self._post(self.fmt.placeholder)
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
            if self.message_ids and not finished:
                with contextlib.suppress(Exception):
                    update = self.messages.update(self.message_ids[0], self.fmt.interrupted)
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

    def _chunks(self, text: str) -> list[str]:
        return [self.fmt.escape(c) for c in split_message(text, self.fmt.limit, self.fmt.cost)]

    async def _interim(self, text: str) -> bool:
        chunks = self._chunks(text) or [""]
        tail = "\n…" if chunks[-1].endswith(FENCE) else self.fmt.suffix
        if len(chunks[-1]) + len(tail) <= self.fmt.limit:
            chunks[-1] += tail
        return await self._show(chunks, final=False)

    async def _finish(self, final: Final) -> None:
        if final.ephemeral:
            await self._delete(0)
            await self.messages.post_ephemeral(self.fmt.escape(final.text))
            return
        text = final.text if final.kind != "error" else self.fmt.warning + final.text
        shown = await self._show(self._chunks(text) or [self.fmt.escape(self.fmt.empty)], final=True)
        if shown and final.files:
            note = await self.messages.upload(final.files)
            if note:
                await self._post(self.fmt.escape(note)[: self.fmt.limit])

    async def _show(self, chunks: list[str], final: bool) -> bool:
        """Make our messages show ``chunks``: edit what changed, post what is new, delete what is left over."""
        for i, chunk in enumerate(chunks):
            if i >= len(self.message_ids):
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
        if not await self.messages.update(self.message_ids[i], text):
            if not final:
                return False
            await self._delete(i)  # the message is gone or frozen: continue in a new one
            return await self._post(text)
        self.shown[i], self.last_edit = text, self.clock()
        return True

    async def _post(self, text: str) -> bool:
        message_id = await self.messages.post(text)
        if message_id is None:
            return False
        self.message_ids.append(message_id)
        self.shown.append(text)
        return True

    async def _delete(self, start: int) -> None:
        for message_id in self.message_ids[start:]:
            await self.messages.delete(message_id)
        del self.message_ids[start:], self.shown[start:]


class InFlight:
    """The answers a front end is working on, so that ``stop()`` interrupts every one of them.

    Each handler runs ``with in_flight.track():``; :meth:`cancel_all` cancels the tracked tasks and waits
    for them (their replies say the answer was interrupted; the core marks it so).
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)
