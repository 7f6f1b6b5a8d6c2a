"""Async database access (SQLAlchemy 2): SQLite via aiosqlite by default, PostgreSQL via asyncpg by URL.

:class:`Database` is the only way the bot touches SQL.  Each method is one short transaction,
so a crash loses at most the answer being streamed — which is then marked ``interrupted``
at the next start (:meth:`Database.mark_interrupted`), never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Integer, case, delete, event, func, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from storage.private import private_sqlite
from storage.tables import (
    AccessRule,
    ApiKey,
    Base,
    Conversation,
    FollowedThread,
    ImageBlob,
    ProcessedEvent,
    QuotaSetting,
    Turn,
    UsageEntry,
    Worker,
    utcnow,
)
from storage.url import sqlite_url

__all__ = [
    "API_KEY_PREFIX",
    "Admission",
    "Clock",
    "ConversationKey",
    "Database",
    "UsageTotals",
    "as_utc",
    "is_unavailable",
    "sqlite_url",
]

Clock = Callable[[], datetime]
"""Returns the current time (aware; converted to UTC).  Production: wall-clock UTC; tests move it."""

QUOTA_LIMITS: tuple[str, ...] = tuple(
    column.name for column in QuotaSetting.__table__.columns if column.nullable and isinstance(column.type, Integer)
)
"""The limits a quota override stores: :class:`QuotaSetting`'s nullable integer columns (``None`` = the default)."""


# SQLSTATEs that mean "not now" rather than "wrong": class 08 (connection exception), the server shutting
# down or starting up (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now), too many
# connections (53300).
_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03", "53300")

API_KEY_PREFIX = "sk-mgb-"
"""How every API key starts (``sk-`` as tools expect of OpenAI-style keys; ``mgb`` names the bot, so a key
found in a file or a log says whose it is).  Then the key's public id (12 hex digits), ``-`` and the secret."""
_API_KEY_RE = re.compile(rf"^{re.escape(API_KEY_PREFIX)}([0-9a-f]{{12}})-([A-Za-z0-9_-]{{43}})$")
_LAST_USED_EVERY_S = 60
"""``last_used_at`` is written at most once a minute per key: a busy key costs no UPDATE per request."""


def split_api_key(key: str) -> tuple[str, str] | None:
    """(public id, secret) of a well-formed key, else ``None``.  Split by the format, not at the last ``-``:
    the URL-safe secret may itself hold ``-``."""
    match = _API_KEY_RE.match(key)
    return (match.group(1), match.group(2)) if match else None


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached right now (down, restarting, the connection
    dropped, a lock timeout) — worth retrying later — rather than that the statement itself is wrong.

    Looks through the chain SQLAlchemy wraps driver errors in (``orig``, ``__cause__``): a server that is
    still starting up reaches us as a plain ``DBAPIError`` around asyncpg's ``CannotConnectNowError``.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, DBAPIError) and (
            error.connection_invalidated or isinstance(error, OperationalError | InterfaceError)
        ):
            return True
        if isinstance(error, OSError | TimeoutError):  # connection refused / reset, a connect timeout
            return True
        state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(state, str) and (state.startswith("08") or state in _UNAVAILABLE_STATES):
            return True
        orig = getattr(error, "orig", None)
        stack += [orig if isinstance(orig, BaseException) else None, error.__cause__]
    return False


def as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything stored is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class ConversationKey:
    """Identifies a thread on a platform."""

    platform: str
    workspace: str
    channel: str
    thread: str


@dataclass(frozen=True)
class UsageTotals:
    requests: int = 0
    tokens: int = 0
    images: int = 0


class Database:
    """All queries the bot, the admin CLI and the tests need.

    ``clock`` is the one source of "now" for everything stored and compared: every row's timestamps
    come from it, and the core and the admin commands ask :meth:`now` rather than the wall clock, so
    a day's quota, a usage report, a purge cutoff and event pruning can never disagree.
    """

    def __init__(self, url: str, *, echo: bool = False, clock: Clock = utcnow) -> None:
        self.url = url
        self.clock = clock
        kwargs: dict[str, Any] = {"echo": echo}
        if url.startswith("sqlite"):
            private_sqlite(url)  # 0600 before SQLite creates it: the -wal/-shm files follow its mode
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._ping: asyncio.Task[None] | None = None
        self._gate: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    def now(self) -> datetime:
        """The current time from this database's clock, in UTC."""
        return as_utc(self.clock())

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def create_all(self) -> None:
        """Create the schema directly (tests); production uses ``minigpt4-bot admin db upgrade``."""
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

    async def dispose(self) -> None:
        ping, self._ping = self._ping, None
        if ping is not None and not ping.done() and ping.get_loop() is asyncio.get_running_loop():
            ping.cancel()
            with contextlib.suppress(BaseException):
                await ping
        await self.engine.dispose()

    async def ping(self, timeout: float = 1.0) -> None:
        """``SELECT 1`` on a pooled connection; raises if the database does not answer within ``timeout`` s
        (``TimeoutError``) or cannot be reached (the driver's error).  For readiness checks.

        The query runs in its own task, which a timeout does not cancel (cancelling a connection attempt
        half-way can leave the pool in a bad state); a probe that finds one still running waits for that
        one, so a hanging server never piles up more than one ping.
        """
        task = self._ping
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            task = self._ping = asyncio.ensure_future(self._select_one())
            task.add_done_callback(_consume)
        await asyncio.wait_for(asyncio.shield(task), timeout)

    async def _select_one(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    # ------------------------------------------------------------------ events

    async def mark_event(self, platform: str, event_id: str) -> bool:
        """Record a platform event id; ``False`` if it was seen before (a retry or redelivery) — unless the
        answer it got failed or was interrupted (a crash, the user left): that event is claimed again, so a
        retry is answered.  An event still being answered, or answered, stays a duplicate."""
        try:
            async with self.sessions.begin() as session:
                session.add(ProcessedEvent(platform=platform, event_id=event_id, received_at=self.now()))
        except IntegrityError:
            return await self._retake_event(platform, event_id)
        return True

    async def _retake_event(self, platform: str, event_id: str) -> bool:
        """Claim a seen event whose answer failed or was interrupted, in one transaction that first takes the
        event's row (a conditional UPDATE: of simultaneous retries exactly one wins, the others find the link
        cleared), then clears the link and marks the earlier attempt's user turns ``retried``: kept, but left
        out of what the model sees, so the retried message is not in the thread twice.  No link: refused
        before an answer, or being answered and not stored yet — a duplicate."""
        key = (ProcessedEvent.platform == platform, ProcessedEvent.event_id == event_id)
        ended = select(Turn.id).where(Turn.status.in_(("failed", "interrupted")))
        async with self.sessions.begin() as session:
            claim = update(ProcessedEvent).where(*key, ProcessedEvent.turn_id.in_(ended))
            if not (await session.execute(claim.values(received_at=self.now()))).rowcount:
                return False
            answer = await session.get(Turn, await session.scalar(select(ProcessedEvent.turn_id).where(*key)))
            await session.execute(update(ProcessedEvent).where(*key).values(turn_id=None))
            if answer is not None:
                await session.execute(_attempt_questions(answer).values(status="retried", updated_at=self.now()))
            return True

    async def event_seen(self, platform: str, event_id: str) -> bool:
        """Whether :meth:`mark_event` would refuse the event now (a read: nothing recorded) — for a front end
        that asks before fetching what a request needs.  An event whose answer failed or was interrupted is
        not seen: its retry will be answered."""
        query = (
            select(Turn.status)
            .select_from(ProcessedEvent)
            .outerjoin(Turn, Turn.id == ProcessedEvent.turn_id)
            .where(ProcessedEvent.platform == platform, ProcessedEvent.event_id == event_id)
        )
        async with self.sessions() as session:
            found = (await session.execute(query)).first()
        return found is not None and found.status not in ("failed", "interrupted")

    async def prune_events(self, older_than: datetime) -> int:
        async with self.sessions.begin() as session:
            result = await session.execute(delete(ProcessedEvent).where(ProcessedEvent.received_at < older_than))
            return result.rowcount or 0

    # ------------------------------------------------------------------ conversations

    async def live_conversation(self, key: ConversationKey) -> Conversation | None:
        async with self.sessions() as session:
            return await session.scalar(_live(key))

    async def get_or_create_conversation(self, key: ConversationKey) -> Conversation:
        """The thread's live conversation, created on first use (safe under concurrent first messages)."""
        for _ in range(3):
            async with self.sessions() as session:
                found = await session.scalar(_live(key))
                if found is not None:
                    return found
                now = self.now()
                session.add(conv := Conversation(**key.__dict__, created_at=now, updated_at=now))
                try:
                    await session.commit()
                    return conv
                except IntegrityError:
                    await session.rollback()
        raise RuntimeError(f"could not create a conversation for {key}")

    async def archive_conversation(self, conversation_id: int) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                update(Conversation).where(Conversation.id == conversation_id).values(archived_at=self.now())
            )

    async def set_preset(self, conversation_id: int, preset: str | None) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id)
                .values(preset=preset, updated_at=self.now())
            )

    async def turns(self, conversation_id: int) -> list[Turn]:
        async with self.sessions() as session:
            rows = await session.scalars(select(Turn).where(Turn.conversation_id == conversation_id).order_by(Turn.seq))
            return list(rows)

    async def get_conversation(self, conversation_id: int) -> Conversation | None:
        async with self.sessions() as session:
            return await session.get(Conversation, conversation_id)

    async def list_conversations(
        self, platform: str | None = None, workspace: str | None = None, limit: int = 50
    ) -> list[tuple[Conversation, int]]:
        """Most recently updated conversations with their turn counts."""
        async with self.sessions() as session:
            query = (
                select(Conversation, func.count(Turn.id))
                .outerjoin(Turn, Turn.conversation_id == Conversation.id)
                .group_by(Conversation.id)
                .order_by(Conversation.updated_at.desc())
                .limit(limit)
            )
            if platform:
                query = query.where(Conversation.platform == platform)
            if workspace:
                query = query.where(Conversation.workspace == workspace)
            return [(c, n) for c, n in (await session.execute(query)).all()]

    async def conversation_ids(self) -> list[int]:
        """Every conversation id, archived ones too, oldest first (for exports)."""
        async with self.sessions() as session:
            return list(await session.scalars(select(Conversation.id).order_by(Conversation.id)))

    async def count_conversations_before(self, older_than: datetime) -> int:
        """How many conversations :meth:`purge_conversations` would delete."""
        async with self.sessions() as session:
            query = select(func.count(Conversation.id)).where(Conversation.updated_at < older_than)
            return int(await session.scalar(query) or 0)

    async def purge_conversations(self, older_than: datetime) -> int:
        """Delete conversations (and their turns) not updated since ``older_than``; unreferenced images too."""
        async with self.sessions.begin() as session:
            ids = list(await session.scalars(select(Conversation.id).where(Conversation.updated_at < older_than)))
            if not ids:
                return 0
            await session.execute(update(UsageEntry).where(UsageEntry.turn_id.in_(
                select(Turn.id).where(Turn.conversation_id.in_(ids)))).values(turn_id=None))  # fmt: skip
            await session.execute(delete(Turn).where(Turn.conversation_id.in_(ids)))
            await session.execute(delete(Conversation).where(Conversation.id.in_(ids)))
            used = select(Turn.image_id).where(Turn.image_id.is_not(None))
            await session.execute(delete(ImageBlob).where(ImageBlob.id.not_in(used)))
            await session.execute(delete(FollowedThread).where(FollowedThread.addressed_at < older_than))
            return len(ids)

    async def follow_thread(self, key: ConversationKey) -> None:
        """Remember that the bot was addressed in this thread (insert, or touch the time)."""
        now = self.now()
        async with self.sessions() as session:
            row = await session.get(FollowedThread, (key.platform, key.workspace, key.channel, key.thread))
            if row is not None:
                row.addressed_at = now
                await session.commit()
                return
            session.add(FollowedThread(**key.__dict__, addressed_at=now))
            try:
                await session.commit()
            except IntegrityError:  # a concurrent first address: the row is there, which is all we need
                await session.rollback()

    async def is_followed(self, key: ConversationKey) -> bool:
        async with self.sessions() as session:
            pk = (key.platform, key.workspace, key.channel, key.thread)
            return await session.get(FollowedThread, pk) is not None

    # ------------------------------------------------------------------ images and turns

    async def add_image(self, data: bytes, mime: str, width: int, height: int) -> int:
        """Store image bytes once per SHA-256 and return the row id."""
        digest = hashlib.sha256(data).hexdigest()
        for _ in range(3):
            async with self.sessions() as session:
                existing = await session.scalar(select(ImageBlob.id).where(ImageBlob.sha256 == digest))
                if existing is not None:
                    return existing
                blob = ImageBlob(
                    sha256=digest,
                    mime=mime,
                    width=width,
                    height=height,
                    size=len(data),
                    data=data,
                    created_at=self.now(),
                )
                session.add(blob)
                try:
                    await session.commit()
                    return blob.id
                except IntegrityError:
                    await session.rollback()
        raise RuntimeError("could not store image")

    async def image_data(self, ids: Sequence[int]) -> dict[int, bytes]:
        if not ids:
            return {}
        async with self.sessions() as session:
            rows = await session.execute(select(ImageBlob.id, ImageBlob.data).where(ImageBlob.id.in_(list(ids))))
            return {i: d for i, d in rows.all()}

    async def image_info(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """sha256, size, mime, width and height per image id — everything but the bytes."""
        if not ids:
            return {}
        columns = (ImageBlob.sha256, ImageBlob.size, ImageBlob.mime, ImageBlob.width, ImageBlob.height)
        async with self.sessions() as session:
            rows = await session.execute(select(ImageBlob.id, *columns).where(ImageBlob.id.in_(list(set(ids)))))
            return {row.id: {c.key: getattr(row, c.key) for c in columns} for row in rows.all()}

    async def add_turns(
        self, conversation_id: int, turns: Sequence[dict[str, Any]], *, event: tuple[str, str] | None = None
    ) -> list[Turn]:
        """Append turns (dicts of Turn columns) after the last one, atomically.  ``event`` (platform, event
        id): the processed event these turns answer, linked to the last turn in the same transaction, so a
        crash can never leave an answer whose event a retry cannot find (:meth:`mark_event`)."""
        for _ in range(5):
            async with self.sessions() as session:
                try:
                    # Touch the conversation first: that takes its row lock (PostgreSQL) or the write lock
                    # (SQLite), so concurrent appends to one thread queue up and each reads the last seq.
                    now = self.now()
                    await session.execute(
                        update(Conversation).where(Conversation.id == conversation_id).values(updated_at=now)
                    )
                    last = await session.scalar(
                        select(func.max(Turn.seq)).where(Turn.conversation_id == conversation_id)
                    )
                    seq = (last or 0) + 1
                    rows = [
                        Turn(conversation_id=conversation_id, seq=seq + i, created_at=now, updated_at=now, **values)
                        for i, values in enumerate(turns)
                    ]
                    session.add_all(rows)
                    if event is not None:
                        await session.flush()
                        await session.execute(
                            update(ProcessedEvent)
                            .where(ProcessedEvent.platform == event[0], ProcessedEvent.event_id == event[1])
                            .values(turn_id=rows[-1].id)
                        )
                    await session.commit()
                    return rows
                except IntegrityError:  # should not happen with the lock above; retry to be safe
                    await session.rollback()
        raise RuntimeError("could not append turns")

    async def finish_turn(
        self, turn_id: int, *, usage_id: int | None = None, tokens: int = 0, release: bool = False, **values: Any
    ) -> None:
        """Update an assistant turn (text, status, counts) and, in the same transaction, settle the usage
        reservation its request was admitted with (:meth:`admission`): ``tokens`` and the turn are written to
        ledger row ``usage_id``, or the row is deleted with ``release=True`` (the bot failed to answer, so the
        request is not charged).  Idempotent: a retried write sets the same values again."""
        now = self.now()
        async with self.sessions.begin() as session:
            await session.execute(update(Turn).where(Turn.id == turn_id).values(updated_at=now, **values))
            if usage_id is not None:
                row = UsageEntry.id == usage_id
                if release:
                    await session.execute(delete(UsageEntry).where(row))
                else:
                    await session.execute(update(UsageEntry).where(row).values(turn_id=turn_id, tokens=tokens))

    async def save_partial(self, turn_id: int, text: str) -> bool:
        """Store the text streamed so far of an answer still being written (a cheap UPDATE of one row), so a
        crash keeps it.  Only while the answer is unfinished: a late write never overwrites a final one."""
        async with self.sessions.begin() as session:
            result = await session.execute(
                update(Turn)
                .where(Turn.id == turn_id, Turn.status.in_(("pending", "streaming")))
                .values(text=text, updated_at=self.now())
            )
            return bool(result.rowcount)

    async def mark_interrupted(self, *, live_since: datetime | None = None, dead: Sequence[str] = ()) -> int:
        """Answers left ``pending``/``streaming`` by a process that is gone become ``interrupted`` (kept, not
        deleted, with the text :meth:`save_partial` stored while they streamed).  Without ``live_since``:
        every unfinished answer (one process, at its start).  With it: only
        those of processes whose heartbeat is older than ``live_since``, listed in ``dead`` or unknown (no
        worker recorded, or its row pruned) — and the rows of workers not seen since ``live_since`` are pruned.
        A caller that has just touched its own row (:meth:`register_worker`) is alive by that rule."""
        unfinished = Turn.status.in_(("pending", "streaming"))
        async with self.sessions.begin() as session:
            if live_since is not None:
                await session.execute(delete(Worker).where(Worker.seen_at < live_since))
                alive = select(Worker.id).where(Worker.id.not_in(list(dead)))
                unfinished = unfinished & (Turn.worker.is_(None) | Turn.worker.not_in(alive))
            result = await session.execute(
                update(Turn)
                .where(unfinished)
                .values(status="interrupted", finish_reason="interrupted", updated_at=self.now())
                .execution_options(synchronize_session=False)
            )
            return result.rowcount or 0

    # ------------------------------------------------------------------ workers

    async def register_worker(self, worker_id: str, host: str, pid: int) -> None:
        """Record this process as running (or touch its heartbeat)."""
        now = self.now()
        async with self.sessions() as session:
            row = await session.get(Worker, worker_id)
            if row is None:
                session.add(Worker(id=worker_id, host=host[:255], pid=pid, started_at=now, seen_at=now))
            else:
                row.seen_at = now
            try:
                await session.commit()
            except IntegrityError:  # registered meanwhile by a concurrent heartbeat: that is all we need
                await session.rollback()

    async def remove_worker(self, worker_id: str) -> None:
        """A clean shutdown: this process writes nothing more."""
        async with self.sessions.begin() as session:
            await session.execute(delete(Worker).where(Worker.id == worker_id))

    async def workers(self) -> list[Worker]:
        async with self.sessions() as session:
            return list(await session.scalars(select(Worker).order_by(Worker.started_at)))

    # ------------------------------------------------------------------ usage and quotas

    @contextlib.asynccontextmanager
    async def admission(
        self, platform: str, workspace: str, user_id: str, *, images: int = 0
    ) -> AsyncIterator[Admission]:
        """Admit one request: write its usage reservation and let the caller check quotas in one transaction.

        The reservation (a ledger row: one request, ``images`` pictures, no tokens yet) is inserted first;
        the body then reads limits and usage through the yielded :class:`Admission` and raises to refuse,
        which rolls the reservation back.  Reads of usage are serialized per workspace — a transaction-scoped
        advisory lock on PostgreSQL, the database write lock (taken by the insert) on SQLite — so two
        simultaneous requests, in one process or in several, can never both see the usage from before the
        other's reservation: what one admits, the next one counts.  The final write completes the row
        (:meth:`finish_turn`).

        On SQLite this process's admissions also queue on an in-process lock first: the database lock is
        the real guard, but waiters on it poll with sleeps (the busy timeout), so letting one admission at a
        time ask for it keeps them from stepping on each other.
        """
        async with self._sqlite_gate(), self.sessions.begin() as session:
            entry = UsageEntry(at=self.now(), platform=platform, workspace=workspace, user_id=user_id,
                               requests=1, tokens=0, images=images)  # fmt: skip
            session.add(entry)
            await session.flush()  # SQLite: this INSERT takes the write lock before anything is read
            yield Admission(session, self.dialect, entry.id, platform, workspace)

    def _sqlite_gate(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """An asyncio lock per event loop on SQLite (see :meth:`admission`); nothing on PostgreSQL."""
        if self.dialect != "sqlite":
            return contextlib.nullcontext()
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate[0] is not loop:
            self._gate = (loop, asyncio.Lock())
        return self._gate[1]

    async def release_usage(self, usage_id: int) -> None:
        """Delete a reservation whose request never reached the model (storing its turns failed)."""
        async with self.sessions.begin() as session:
            await session.execute(delete(UsageEntry).where(UsageEntry.id == usage_id))

    async def record_usage(self, **values: Any) -> None:
        """Add a ledger row; ``at`` defaults to :meth:`now` (imports and tests may back-date it)."""
        values.setdefault("at", self.now())
        async with self.sessions.begin() as session:
            session.add(UsageEntry(**values))

    async def usage_since(self, platform: str, workspace: str, user_id: str | None, since: datetime) -> UsageTotals:
        """Ledger sums since ``since`` for a user (``user_id=None``: the whole workspace)."""
        return (await self.usage_windows(platform, workspace, user_id, {"since": since}))["since"]

    async def usage_windows(
        self, platform: str, workspace: str, user_id: str | None, starts: Mapping[str, datetime]
    ) -> dict[str, UsageTotals]:
        """Ledger sums since each of ``starts`` (e.g. the day's and the month's start), in one query."""
        async with self.sessions() as session:
            return await _usage_windows(session, platform, workspace, user_id, starts)

    async def usage_report(
        self, since: datetime, platform: str | None = None, workspace: str | None = None, by_day: bool = False
    ) -> list[dict[str, Any]]:
        """Usage per user (and per day) since a time, largest token users first."""
        # UTC days on both databases (PostgreSQL would otherwise use the server's TimeZone).
        if self.dialect == "sqlite":
            day = func.date(UsageEntry.at)
        else:
            day = func.to_char(func.timezone("UTC", UsageEntry.at), "YYYY-MM-DD")
        columns = [UsageEntry.platform, UsageEntry.workspace, UsageEntry.user_id]
        if by_day:
            columns.append(day.label("day"))
        query = select(
            *columns,
            func.sum(UsageEntry.requests).label("requests"),
            func.sum(UsageEntry.tokens).label("tokens"),
            func.sum(UsageEntry.images).label("images"),
        ).where(UsageEntry.at >= since)
        if platform:
            query = query.where(UsageEntry.platform == platform)
        if workspace:
            query = query.where(UsageEntry.workspace == workspace)
        query = query.group_by(*columns)
        order = [day.desc()] if by_day else []
        query = query.order_by(*order, func.sum(UsageEntry.tokens).desc())
        async with self.sessions() as session:
            return [dict(row._mapping) for row in (await session.execute(query)).all()]

    async def quota_setting(self, scope: str, platform: str, workspace: str, user_id: str = "") -> QuotaSetting | None:
        async with self.sessions() as session:
            return await _quota_setting(session, scope, platform, workspace, user_id)

    async def set_quota(self, scope: str, platform: str, workspace: str, user_id: str = "", **limits: Any) -> None:
        """Set some limits (``None`` = back to the default) for a user or a workspace."""
        unknown = set(limits) - set(QUOTA_LIMITS)
        if unknown:
            raise ValueError(f"unknown quota field(s): {', '.join(sorted(unknown))}")
        async with self.sessions.begin() as session:
            row = await session.scalar(select(QuotaSetting).where(*_quota_key(scope, platform, workspace, user_id)))
            if row is None:
                row = QuotaSetting(scope=scope, platform=platform, workspace=workspace, user_id=user_id)
                session.add(row)
            row.updated_at = self.now()
            for name, value in limits.items():
                setattr(row, name, value)

    async def reset_quota(self, scope: str, platform: str, workspace: str, user_id: str = "") -> bool:
        async with self.sessions.begin() as session:
            result = await session.execute(delete(QuotaSetting).where(*_quota_key(scope, platform, workspace, user_id)))
            return bool(result.rowcount)

    async def list_quotas(self) -> list[QuotaSetting]:
        async with self.sessions() as session:
            return list(await session.scalars(select(QuotaSetting).order_by(QuotaSetting.scope, QuotaSetting.id)))

    # ------------------------------------------------------------------ access rules

    async def add_rule(self, action: str, target: str, platform: str, value: str, note: str | None = None) -> bool:
        if action not in ("allow", "deny") or target not in ("user", "channel", "workspace", "role"):
            raise ValueError("action must be allow|deny and target user|channel|workspace|role")
        try:
            async with self.sessions.begin() as session:
                session.add(
                    AccessRule(
                        action=action, target=target, platform=platform, value=value, note=note, created_at=self.now()
                    )
                )
        except IntegrityError:
            return False
        return True

    async def remove_rule(self, action: str, target: str, platform: str, value: str) -> bool:
        async with self.sessions.begin() as session:
            result = await session.execute(
                delete(AccessRule).where(
                    AccessRule.action == action,
                    AccessRule.target == target,
                    AccessRule.platform == platform,
                    AccessRule.value == value,
                )
            )
            return bool(result.rowcount)

    async def rules(self, platform: str | None = None) -> list[AccessRule]:
        async with self.sessions() as session:
            query = select(AccessRule).order_by(AccessRule.action, AccessRule.target, AccessRule.value)
            if platform:
                query = query.where(AccessRule.platform == platform)
            return list(await session.scalars(query))

    # ------------------------------------------------------------------ API keys

    async def create_api_key(
        self, platform: str, workspace: str, user_id: str, note: str | None = None
    ) -> tuple[ApiKey, str]:
        """A new key for ``user_id`` of ``workspace`` on ``platform``: (its row, the key).  The key itself is
        returned only here — the table keeps its SHA-256 — so the caller shows it once."""
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        key = f"{API_KEY_PREFIX}{key_id}-{secret}"
        row = ApiKey(key_id=key_id, secret_hash=_key_hash(key), platform=platform, workspace=workspace,
                     user_id=user_id, note=note, created_at=self.now())  # fmt: skip
        async with self.sessions.begin() as session:
            session.add(row)
        return row, key

    async def verify_api_key(self, platform: str, key: str) -> ApiKey | None:
        """The live key ``key`` names on ``platform``, or ``None`` (malformed, unknown, revoked, another
        platform's).  The hashes are compared in constant time (a hash is computed and compared even when the
        id is unknown); ``last_used_at`` is recorded (at most once a minute)."""
        parts = split_api_key(key)
        async with self.sessions() as session:
            row = await session.scalar(select(ApiKey).where(ApiKey.key_id == parts[0])) if parts else None
        expected = row.secret_hash if row is not None else "0" * 64
        if not hmac.compare_digest(_key_hash(key), expected) or row is None:
            return None
        if row.revoked_at is not None or row.platform != platform:
            return None
        now = self.now()
        if row.last_used_at is None or (now - as_utc(row.last_used_at)).total_seconds() >= _LAST_USED_EVERY_S:
            async with self.sessions.begin() as session:
                await session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
            row.last_used_at = now
        return row

    async def api_keys(self, platform: str | None = None) -> list[ApiKey]:
        """Every key (revoked ones too), oldest first; optionally of one platform."""
        async with self.sessions() as session:
            query = select(ApiKey).order_by(ApiKey.id)
            if platform:
                query = query.where(ApiKey.platform == platform)
            return list(await session.scalars(query))

    async def revoke_api_key(self, key_ref: int | str) -> ApiKey | None:
        """Revoke the key with row id or public ``key_id`` ``key_ref``: the row, or ``None`` when there is none.
        Revoking a revoked key changes nothing (its first ``revoked_at`` stays)."""
        column = ApiKey.id if isinstance(key_ref, int) else ApiKey.key_id
        async with self.sessions.begin() as session:
            row = await session.scalar(select(ApiKey).where(column == key_ref))
            if row is not None and row.revoked_at is None:
                row.revoked_at = self.now()
            return row


def _key_hash(key: str) -> str:
    """SHA-256 of an API key: keys are 256 random bits, so a fast hash is as safe as a slow one here."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class Admission:
    """The reads a quota check makes inside :meth:`Database.admission`'s transaction.

    Same signatures as :class:`Database`'s ``quota_setting`` and ``usage_windows``, so a policy reads either.
    Usage sums leave out this request's own reservation: they are what was used before it.
    """

    def __init__(self, session: Any, dialect: str, usage_id: int, platform: str, workspace: str) -> None:
        self._session = session
        self.usage_id = usage_id
        """The reservation's ledger row, for :meth:`Database.finish_turn`."""
        self._lock_key = advisory_key("quota", platform, workspace)
        self._locked = dialect != "postgresql"  # SQLite: the reservation's insert holds the write lock

    async def quota_setting(self, scope: str, platform: str, workspace: str, user_id: str = "") -> QuotaSetting | None:
        return await _quota_setting(self._session, scope, platform, workspace, user_id)

    async def usage_windows(
        self, platform: str, workspace: str, user_id: str | None, starts: Mapping[str, datetime]
    ) -> dict[str, UsageTotals]:
        if not self._locked:
            # Held until commit/rollback.  Taken before the first usage read (READ COMMITTED: each statement
            # sees what was committed when it starts), so it sees every admission that committed before it.
            await self._session.execute(select(func.pg_advisory_xact_lock(self._lock_key)))
            self._locked = True
        return await _usage_windows(self._session, platform, workspace, user_id, starts, not_id=self.usage_id)


def advisory_key(*parts: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's ``pg_advisory_xact_lock`` (the same in every process):
    quota admissions per workspace, schema upgrades (:mod:`storage.migrate`)."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def _quota_setting(session: Any, scope: str, platform: str, workspace: str, user_id: str) -> QuotaSetting | None:
    return await session.scalar(select(QuotaSetting).where(*_quota_key(scope, platform, workspace, user_id)))


async def _usage_windows(
    session: Any,
    platform: str,
    workspace: str,
    user_id: str | None,
    starts: Mapping[str, datetime],
    not_id: int | None = None,
) -> dict[str, UsageTotals]:
    """One pass over the ledger rows since the earliest start: conditional sums per window."""
    columns = []
    for start in starts.values():
        recent = UsageEntry.at >= start
        for counter in (UsageEntry.requests, UsageEntry.tokens, UsageEntry.images):
            columns.append(func.coalesce(func.sum(case((recent, counter), else_=0)), 0))
    query = select(*columns).where(
        UsageEntry.platform == platform, UsageEntry.workspace == workspace, UsageEntry.at >= min(starts.values())
    )
    if user_id is not None:
        query = query.where(UsageEntry.user_id == user_id)
    if not_id is not None:
        query = query.where(UsageEntry.id != not_id)
    sums = [int(value) for value in (await session.execute(query)).one()]
    return {name: UsageTotals(*sums[3 * i : 3 * i + 3]) for i, name in enumerate(starts)}


def _quota_key(scope: str, platform: str, workspace: str, user_id: str) -> tuple[Any, ...]:
    """The columns that identify one quota override."""
    return (
        QuotaSetting.scope == scope,
        QuotaSetting.platform == platform,
        QuotaSetting.workspace == workspace,
        QuotaSetting.user_id == user_id,
    )


def _attempt_questions(answer: Turn) -> Any:
    """An UPDATE of the user turns that asked for ``answer``: those after the answer before it."""
    in_thread = Turn.conversation_id == answer.conversation_id
    before = select(func.coalesce(func.max(Turn.seq), 0)).where(
        in_thread, Turn.role == "assistant", Turn.seq < answer.seq
    )
    return update(Turn).where(
        in_thread, Turn.role == "user", Turn.seq < answer.seq, Turn.seq > before.scalar_subquery()
    )


def _live(key: ConversationKey) -> Any:
    return select(Conversation).where(
        Conversation.platform == key.platform,
        Conversation.workspace == key.workspace,
        Conversation.channel == key.channel,
        Conversation.thread == key.thread,
        Conversation.archived_at.is_(None),
    )


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve a finished ping's error, so a ping nobody waited for logs no "never retrieved" warning."""
    if not task.cancelled():
        task.exception()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
