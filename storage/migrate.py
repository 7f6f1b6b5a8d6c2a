"""Alembic migrations without an ``alembic.ini``: works from the repository and from an installed wheel.

``upgrade(url)`` brings a database (SQLite or PostgreSQL, sync or async URL) to the newest schema;
``minigpt4-bot admin db upgrade`` calls it.  The revisions live in the top-level ``migrations/``
folder, installed beside this package.  Inside a running event loop use the ``*_async`` variants:
they run Alembic on a connection of an async engine instead of starting a loop of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, pool, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from storage.ledger import advisory_key
from storage.private import private_sqlite

__all__ = [
    "MIGRATIONS_DIR",
    "SchemaMismatch",
    "alembic_config",
    "current",
    "current_async",
    "downgrade",
    "downgrade_async",
    "head",
    "stamp",
    "upgrade",
    "upgrade_async",
]

# storage/ and migrations/ are siblings both in the repository and in site-packages.
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` for ``migrations/``; the URL (or an open connection) goes in ``attributes``."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(f"Alembic migrations not found at {MIGRATIONS_DIR} (broken install?)")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.attributes["url"] = _async_url(url)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision in ``migrations/versions``."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"expected one migration head, found {heads}")
    return heads[0]


def upgrade(url: str, revision: str = "head") -> str | None:
    """Run migrations up to ``revision``; returns the database's revision afterwards.

    A database whose tables were made by ``Database.create_all`` (no Alembic revision recorded yet)
    is adopted: stamped at the head when its schema equals the models, refused otherwise.  Processes
    that upgrade at the same moment (several ``serve`` starting together) go one after the other: see
    :func:`_upgrade`.
    """
    return asyncio.run(upgrade_async(url, revision))


def downgrade(url: str, revision: str) -> str | None:
    """Run migrations down to ``revision`` (``"base"`` drops everything); returns the revision afterwards."""
    command.downgrade(alembic_config(url), revision)
    return current(url)


def stamp(url: str, revision: str = "head") -> None:
    """Record ``revision`` without running anything (a schema made by ``Database.create_all``)."""
    command.stamp(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database is at (``None``: never migrated)."""
    return asyncio.run(current_async(url))


async def upgrade_async(url: str, revision: str = "head") -> str | None:
    await _run(url, lambda conn: _upgrade(conn, revision))
    return await current_async(url)


async def downgrade_async(url: str, revision: str) -> str | None:
    await _run(url, lambda conn: command.downgrade(alembic_config(connection=conn), revision))
    return await current_async(url)


async def current_async(url: str) -> str | None:
    return await _run(url, lambda conn: MigrationContext.configure(conn).get_current_revision())


class SchemaMismatch(RuntimeError):
    """Tables exist without a recorded revision and differ from the models: not safe to migrate."""


def _adopt(conn: Connection) -> None:
    from alembic.autogenerate import compare_metadata
    from sqlalchemy import inspect

    from storage.tables import Base

    context = MigrationContext.configure(conn, opts={"compare_type": True})
    if context.get_current_revision() is not None:
        return
    existing = set(inspect(conn).get_table_names()) & {t.name for t in Base.metadata.sorted_tables}
    if not existing:
        return  # a new database: the migrations create everything
    diff = compare_metadata(context, Base.metadata)
    if diff:
        raise SchemaMismatch(
            f"the database has tables ({', '.join(sorted(existing))}) but no migration revision, and they differ "
            f"from the models ({len(diff)} difference(s), first: {diff[0]!r}); fix or stamp it by hand"
        )
    context.stamp(ScriptDirectory.from_config(alembic_config()), "heads")


def _upgrade(conn: Connection, revision: str) -> None:
    """Adopt an unversioned schema, then migrate: one transaction that first takes a database-wide lock —
    ``pg_advisory_xact_lock`` on PostgreSQL (DDL is transactional there), ``BEGIN IMMEDIATE`` on SQLite — so
    a second process starting at the same moment waits, then finds the schema at its revision and does
    nothing, instead of creating the same tables again and failing."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(advisory_key("schema upgrade"))))
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    _adopt(conn)
    command.upgrade(alembic_config(connection=conn), revision)


async def _run(url: str, fn: Callable[[Connection], Any]) -> Any:
    target = _async_url(url)
    private_sqlite(target)  # an upgrade may be what creates the SQLite file: 0600 from the start
    # SQLite: wait for another process's migration (the write lock) for up to a minute, not 5 s.
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if target.startswith("sqlite") else {}
    engine = create_async_engine(target, poolclass=pool.NullPool, **kwargs)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def _async_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if scheme == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    return url
