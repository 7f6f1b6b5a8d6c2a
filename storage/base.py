"""What every store shares: one engine, one session factory, one clock.

Each store (:mod:`storage.conversations`, :mod:`storage.ledger`, …) is a subclass of :class:`Store`, so it
works alone (``LedgerStore(url)`` is a usable ledger), and :class:`storage.Database` is all of them over one
engine.  Keeping one engine and one session factory is what lets a write that spans two aggregates stay one
transaction (an answer's final write settles its usage reservation; a stored answer is linked to its event).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Self, cast

from sqlalchemy import CursorResult, Result, event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from storage.private import private_sqlite
from storage.tables import Base, utcnow

__all__ = ["Clock", "Store", "affected", "as_utc", "is_unavailable"]

Clock = Callable[[], datetime]
"""Returns the current time (aware; converted to UTC).  Production: wall-clock UTC; tests move it."""

# SQLSTATEs that mean "not now" rather than "wrong": class 08 (connection exception), the server shutting
# down or starting up (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now), too many
# connections (53300).
_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03", "53300")


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


def affected(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE touched (SQLAlchemy types ``execute()`` as a ``Result``; DML gives a
    ``CursorResult``, which has the count)."""
    return cast(CursorResult[Any], result).rowcount or 0


class Store:
    """The engine, the session factory and the clock.

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

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """``async with Database(url) as db``: a command or test that opens a database closes it, also on error."""
        await self.dispose()

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
