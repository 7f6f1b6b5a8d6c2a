"""Storage fixtures: every test gets an empty database on SQLite (temp file) and on PostgreSQL.

PostgreSQL is the session's throwaway cluster (``postgres_url`` in ``tests/conftest.py``, ``tests/pg.py``):
tests with the schema share one database that is truncated before each of them; tests that need no
tables at all (migrations) get a database of their own.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from storage import Database, sqlite_url
from storage.tables import Base
from tests.pg import create_database, truncate_tables

BACKENDS = ("sqlite", "postgres")
_numbers = itertools.count()


def _name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{next(_numbers)}"


def _create_all(url: str) -> None:
    async def create() -> None:
        db = Database(url)
        try:
            await db.create_all()
        finally:
            await db.dispose()

    asyncio.run(create())


@pytest.fixture(scope="session")
def pg_schema_url(postgres_url: str) -> str:
    """A PostgreSQL database with the models' schema, emptied before each test that uses it."""
    url = create_database(postgres_url, _name("schema"))
    _create_all(url)
    return url


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new database without any tables."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "empty.db")
    return create_database(request.getfixturevalue("postgres_url"), _name("empty"))


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new database with the schema created from the models."""
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "test.db")
        _create_all(url)
        return url
    url = request.getfixturevalue("pg_schema_url")
    truncate_tables(url, [t.name for t in Base.metadata.sorted_tables])  # ids restart at 1
    return url


@pytest.fixture
def run_db(db_url: str) -> Callable[[Callable[[Database], Awaitable[Any]]], Any]:
    """``run_db(async_fn)``: await ``async_fn(Database)`` in a fresh event loop, disposing the engine after."""

    def run(fn: Callable[[Database], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            db = Database(db_url)
            try:
                return await fn(db)
            finally:
                await db.dispose()

        return asyncio.run(main())

    return run
