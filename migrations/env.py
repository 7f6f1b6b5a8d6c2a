"""Alembic environment: async engines (sqlite+aiosqlite, postgresql+asyncpg), target = storage.tables.

Run through :mod:`storage.migrate` (``minigpt4-bot admin db upgrade``), which passes the URL — or an
open connection — in ``config.attributes``.  ``alembic -c alembic.ini …`` from the repository root
works too (for writing new revisions with ``--autogenerate``); the URL then comes from bot.toml /
``$MINIGPT4_BOT_DATABASE_URL``.

Logging is left to the application: no ``fileConfig`` here and no logging sections in ``alembic.ini``,
so alembic's INFO lines ("Context impl …", "Running upgrade …") show only at ``log_level = "DEBUG"``
(bot/cli/common.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config

from storage.tables import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from bot.core.config import load_settings

        url = load_settings().database_url()
    return url


def _configure(**kwargs: Any) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    url = _url()
    _configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    section = dict(config.get_section(config.config_ini_section) or {})
    section["sqlalchemy.url"] = _url()
    engine = async_engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # storage.migrate.*_async: an open (sync-facing) connection inside run_sync
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
