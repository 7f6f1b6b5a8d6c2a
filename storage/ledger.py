"""The usage ledger and the quota overrides: what was used, and the limits an admin stored.

What a request costs and when a limit is crossed is the core's rule (:mod:`bot.core.quotas`); this store
only writes the rows it is given and sums them.  The counters are the fields of :class:`UsageTotals` (the
ledger's counter columns; ``tests/storage/test_quota_fields.py`` checks that they, the table and the core's
counter list agree), and every query here is built from that list.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, case, delete, func, select, update

from storage.base import Store, affected
from storage.tables import QuotaSetting, UsageEntry

__all__ = [
    "LEDGER_COUNTERS",
    "QUOTA_LIMITS",
    "Admission",
    "LedgerStore",
    "UsageTotals",
    "advisory_key",
    "settle_usage",
    "unlink_turns",
]


@dataclass(frozen=True)
class UsageTotals:
    """Sums of the ledger's counters (or one row's charge): one field per counter column of ``usage_ledger``."""

    requests: int = 0
    tokens: int = 0
    images: int = 0


LEDGER_COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(UsageTotals))
"""The ledger's counters, in order: every sum and report is built from this list."""

QUOTA_LIMITS: tuple[str, ...] = tuple(
    column.name for column in QuotaSetting.__table__.columns if column.nullable and isinstance(column.type, Integer)
)
"""The limits a quota override stores: :class:`QuotaSetting`'s nullable integer columns (``None`` = the default)."""


class LedgerStore(Store):
    """Usage reservations and their settlement, usage sums and reports, quota overrides."""

    _gate: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    @contextlib.asynccontextmanager
    async def admission(
        self, platform: str, workspace: str, user_id: str, reservation: UsageTotals
    ) -> AsyncIterator[Admission]:
        """Admit one request: write its usage reservation and let the caller check quotas in one transaction.

        The reservation (a ledger row charged ``reservation``, e.g. one request and its pictures, no tokens
        yet) is inserted first; the body then reads limits and usage through the yielded :class:`Admission`
        and raises to refuse, which rolls the reservation back.  Reads of usage are serialized per workspace
        — a transaction-scoped advisory lock on PostgreSQL, the database write lock (taken by the insert) on
        SQLite — so two simultaneous requests, in one process or in several, can never both see the usage
        from before the other's reservation: what one admits, the next one counts.  The final write
        completes the row (:meth:`~storage.ConversationStore.finish_turn`).

        On SQLite this process's admissions also queue on an in-process lock first: the database lock is
        the real guard, but waiters on it poll with sleeps (the busy timeout), so letting one admission at a
        time ask for it keeps them from stepping on each other.
        """
        async with self._sqlite_gate(), self.sessions.begin() as session:
            entry = UsageEntry(at=self.now(), platform=platform, workspace=workspace, user_id=user_id,
                               **asdict(reservation))  # fmt: skip
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
        columns: list[Any] = [UsageEntry.platform, UsageEntry.workspace, UsageEntry.user_id]
        if by_day:
            columns.append(day.label("day"))
        sums = [func.sum(getattr(UsageEntry, name)).label(name) for name in LEDGER_COUNTERS]
        query = select(*columns, *sums).where(UsageEntry.at >= since)
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
            return bool(affected(result))

    async def list_quotas(self) -> list[QuotaSetting]:
        async with self.sessions() as session:
            return list(await session.scalars(select(QuotaSetting).order_by(QuotaSetting.scope, QuotaSetting.id)))


class Admission:
    """The reads a quota check makes inside :meth:`LedgerStore.admission`'s transaction.

    Same signatures as :class:`LedgerStore`'s ``quota_setting`` and ``usage_windows``, so a policy reads either.
    Usage sums leave out this request's own reservation: they are what was used before it.
    """

    def __init__(self, session: Any, dialect: str, usage_id: int, platform: str, workspace: str) -> None:
        self._session = session
        self.usage_id = usage_id
        """The reservation's ledger row, for :meth:`~storage.ConversationStore.finish_turn`."""
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


async def settle_usage(session: Any, usage_id: int, turn_id: int, tokens: int, *, release: bool) -> None:
    """Inside an answer's final write: complete reservation ``usage_id`` with the answer's tokens and turn,
    or delete it (``release``: the request is not charged)."""
    row = UsageEntry.id == usage_id
    if release:
        await session.execute(delete(UsageEntry).where(row))
    else:
        await session.execute(update(UsageEntry).where(row).values(turn_id=turn_id, tokens=tokens))


async def unlink_turns(session: Any, turn_ids: Any) -> None:
    """Inside a purge: ledger rows outlive the turns they were charged for (``turn_ids``: a subquery)."""
    await session.execute(update(UsageEntry).where(UsageEntry.turn_id.in_(turn_ids)).values(turn_id=None))


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
    """One pass over the ledger rows since the earliest start: conditional sums per window and counter."""
    columns = []
    for start in starts.values():
        recent = UsageEntry.at >= start
        for name in LEDGER_COUNTERS:
            columns.append(func.coalesce(func.sum(case((recent, getattr(UsageEntry, name)), else_=0)), 0))
    query = select(*columns).where(
        UsageEntry.platform == platform, UsageEntry.workspace == workspace, UsageEntry.at >= min(starts.values())
    )
    if user_id is not None:
        query = query.where(UsageEntry.user_id == user_id)
    if not_id is not None:
        query = query.where(UsageEntry.id != not_id)
    sums = [int(value) for value in (await session.execute(query)).one()]
    width = len(LEDGER_COUNTERS)
    return {name: UsageTotals(*sums[width * i : width * (i + 1)]) for i, name in enumerate(starts)}


def _quota_key(scope: str, platform: str, workspace: str, user_id: str) -> tuple[Any, ...]:
    """The columns that identify one quota override."""
    return (
        QuotaSetting.scope == scope,
        QuotaSetting.platform == platform,
        QuotaSetting.workspace == workspace,
        QuotaSetting.user_id == user_id,
    )
