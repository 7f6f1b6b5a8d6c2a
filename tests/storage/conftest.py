"""Storage fixtures: every test gets an empty database on SQLite (temp file) and on PostgreSQL.

PostgreSQL is the session's throwaway cluster (``postgres_url`` in ``tests/conftest.py``, ``tests/pg.py``):
tests with the schema share one database that is truncated before each of them; tests that need no
tables at all (migrations) get a database of their own.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from storage import sqlite_url
from tests.pg import create_database

BACKENDS = ("sqlite", "postgres")
_numbers = itertools.count()


def _name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{next(_numbers)}"


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new database without any tables."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "empty.db")
    return create_database(request.getfixturevalue("postgres_url"), _name("empty"))
