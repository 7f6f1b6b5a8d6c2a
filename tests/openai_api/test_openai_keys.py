"""API keys: stored as hashes (SQLite and PostgreSQL), checked in constant time, made, listed and revoked by
``minigpt4-bot admin keys``, and never printed anywhere but by ``create``."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

import bot.cli.common
from bot.cli.main import app
from storage import Database
from storage.api_keys import API_KEY_PREFIX, split_api_key
from storage.tables import ApiKey
from tests.pg import create_database

runner = CliRunner()
_numbers = itertools.count()
KEY_RE = re.compile(rf"{re.escape(API_KEY_PREFIX)}[0-9a-f]{{12}}-[A-Za-z0-9_-]{{43}}")


def _secret(key: str) -> str:
    parts = split_api_key(key)
    assert parts is not None, key
    return parts[1]


def test_keys_are_stored_as_hashes_and_verified(run_db: Any) -> None:
    async def main(db: Database) -> None:
        row, key = await db.create_api_key("openai", "acme", "alice", "ci")
        assert KEY_RE.fullmatch(key)
        async with db.sessions() as session:
            stored = (await session.scalars(select(ApiKey))).one()
        assert stored.secret_hash == hashlib.sha256(key.encode()).hexdigest()
        secret = _secret(key)
        assert key not in repr(stored.__dict__) and secret not in repr(stored.__dict__)
        assert stored.last_used_at is None

        found = await db.verify_api_key("openai", key)
        assert found is not None and (found.id, found.user_id, found.workspace) == (row.id, "alice", "acme")
        assert found.last_used_at is not None
        # A key of another platform, a changed secret, a changed id, junk: refused.
        assert await db.verify_api_key("web", key) is None
        assert await db.verify_api_key("openai", key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        other_id = key.replace(row.key_id, "0" * 12 if row.key_id != "0" * 12 else "1" * 12)
        assert await db.verify_api_key("openai", other_id) is None
        for junk in ("", "Bearer", "sk-mgb-", key + "x", key.upper(), "\x00" * 70, "é" * 64):
            assert await db.verify_api_key("openai", junk) is None

        assert (await db.revoke_api_key(row.key_id)).revoked_at is not None
        assert await db.verify_api_key("openai", key) is None
        again = await db.revoke_api_key(row.id)
        assert again is not None and again.revoked_at is not None
        assert await db.revoke_api_key(999) is None
        assert [k.id for k in await db.api_keys()] == [row.id]

    run_db(main)


@pytest.fixture(params=["sqlite", "postgres"])
def config(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A bot.toml on a migrated SQLite or PostgreSQL database, and that database's async URL."""
    monkeypatch.delenv("MINIGPT4_BOT_DATABASE_URL", raising=False)
    monkeypatch.setattr(bot.cli.common.out, "width", 80)  # keys list must fit an 80-column terminal
    if request.param == "sqlite":
        url, plain = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}", "sqlite:///keys.db"
    else:
        url = create_database(request.getfixturevalue("postgres_url"), f"keys_{os.getpid()}_{next(_numbers)}")
        plain = url.replace("+asyncpg", "")
    path = tmp_path / "bot.toml"
    path.write_text(f'data_dir = "state"\n\n[database]\nurl = "{plain}"\n')
    result = runner.invoke(app, ["admin", "db", "upgrade", "--config", str(path)])
    assert result.exit_code == 0, result.output
    return path, url


def _admin(path: Path, *args: str) -> Any:
    return runner.invoke(app, ["admin", "keys", *args, "--config", str(path)])


def test_admin_keys_create_list_revoke(config: tuple[Path, str], caplog: pytest.LogCaptureFixture) -> None:
    path, url = config
    caplog.set_level(logging.DEBUG)
    made = _admin(path, "create", "--user", "Alice", "--workspace", "acme", "--note", "Open WebUI on the NAS")
    assert made.exit_code == 0, made.output
    keys = KEY_RE.findall(made.output)
    assert len(keys) == 1 and "shown only now" in made.output
    key = keys[0]
    second = _admin(path, "create", "--user", "bob")
    assert second.exit_code == 0 and "workspace default" in second.output
    key2 = KEY_RE.findall(second.output)[0]

    listed = _admin(path, "list")
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert max(len(line) for line in lines) <= 80, listed.output
    text = listed.output
    assert "Alice" in text and "acme" in text and "bob" in text and "active" in text and "Open WebUI" in text
    for k in (key, key2):
        assert k not in text and _secret(k)[:8] not in text

    async def verify(k: str) -> Any:
        db = Database(url)
        try:
            return await db.verify_api_key("openai", k)
        finally:
            await db.dispose()

    found = asyncio.run(verify(key))
    assert found is not None and found.user_id == "Alice" and found.workspace == "acme"  # opaque ids keep case

    revoked = _admin(path, "revoke", str(found.id))
    assert revoked.exit_code == 0 and "Revoked key" in revoked.output
    assert asyncio.run(verify(key)) is None and asyncio.run(verify(key2)) is not None
    after = _admin(path, "list")
    assert "revoked" in after.output
    missing = _admin(path, "revoke", "4242")
    assert missing.exit_code == 1 and "No API key 4242" in missing.output
    empty_user = _admin(path, "create", "--user", "  ")
    assert empty_user.exit_code == 1

    logged = "\n".join(r.getMessage() for r in caplog.records)
    for k in (key, key2):
        assert k not in logged and _secret(k) not in logged


def test_a_key_splits_by_its_format_even_when_the_secret_holds_dashes() -> None:
    secret = "ab-" * 14 + "c"  # 43 URL-safe characters, ending like "-c"
    assert split_api_key(f"{API_KEY_PREFIX}{'0' * 12}-{secret}") == ("0" * 12, secret)
    assert split_api_key(f"{API_KEY_PREFIX}{'0' * 12}-{secret}x") is None
