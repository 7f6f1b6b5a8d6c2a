"""The ``admin`` tests' fixtures: the pinned clock, a clean environment, and ``env`` (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import time_machine
from admin_helpers import NOW, Env, numbers, upgrade, write_config

import bot.cli.common
from storage.tables import Base
from tests.pg import create_database, truncate_tables


@pytest.fixture(autouse=True)
def _pinned_clock():
    with time_machine.travel(NOW, tick=True):
        yield


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINIGPT4_BOT_DATABASE_URL", raising=False)
    monkeypatch.delenv("MINIGPT4_BOT_CONFIG", raising=False)
    monkeypatch.setattr(bot.cli.common.out, "width", 220)  # a wide terminal: table cells are not folded


@pytest.fixture(scope="module")
def pg_admin_url(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One PostgreSQL database for this module, migrated once by `admin db upgrade`, truncated per test."""
    url = create_database(postgres_url, f"admin_{next(numbers)}")
    upgrade(write_config(tmp_path_factory.mktemp("pg-admin"), url.replace("+asyncpg", "")))
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    if request.param == "sqlite":
        config = write_config(tmp_path, "sqlite:///admin.db")  # plain URL, relative to bot.toml
        upgrade(config)
        return Env(config, f"sqlite+aiosqlite:///{tmp_path / 'admin.db'}", "sqlite")
    url = request.getfixturevalue("pg_admin_url")
    truncate_tables(url, [t.name for t in Base.metadata.sorted_tables])
    return Env(write_config(tmp_path, url.replace("+asyncpg", "")), url, "postgres")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param
