"""Alembic migrations create exactly the models' schema, on SQLite and PostgreSQL, and round-trip."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from bot.core.requests import ThreadRef
from storage import Database, migrate
from storage.tables import Base
from tests import pg

ROOT = Path(__file__).resolve().parents[2]
TABLES = {t.name for t in Base.metadata.sorted_tables}
HEAD = "0005"


async def _inspect(url: str) -> dict[str, Any]:
    """Schema differences to the models, table names, and the live-thread index's WHERE clause."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:

            def look(sync_conn: Any) -> dict[str, Any]:
                context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
                insp = inspect(sync_conn)
                if sync_conn.dialect.name == "sqlite":
                    where = sync_conn.execute(
                        text("SELECT sql FROM sqlite_master WHERE name = 'uq_conversations_live_thread'")
                    ).scalar()
                else:
                    where = sync_conn.execute(
                        text("SELECT indexdef FROM pg_indexes WHERE indexname = 'uq_conversations_live_thread'")
                    ).scalar()
                return {
                    "diff": compare_metadata(context, Base.metadata),
                    "tables": set(insp.get_table_names()),
                    "live_index": where,
                    "fks": {
                        fk["name"]
                        for name in TABLES & set(insp.get_table_names())
                        for fk in insp.get_foreign_keys(name)
                    },
                    "uniques": {
                        uq["name"]
                        for name in TABLES & set(insp.get_table_names())
                        for uq in insp.get_unique_constraints(name)
                    },
                }

            return await conn.run_sync(look)
    finally:
        await engine.dispose()


def inspect_schema(url: str) -> dict[str, Any]:
    return asyncio.run(_inspect(url))


def _on_db(url: str, fn: Callable[[Database], Awaitable[Any]]) -> Any:
    """``fn(Database(url))`` in a fresh event loop, disposing the engine after."""

    async def main() -> Any:
        async with Database(url) as db:
            return await fn(db)

    return asyncio.run(main())


async def _old_turn(db: Database, conversation_id: int, role: str, text_: str, status: str) -> None:
    """A turn written at an old revision, in plain SQL: the models' Turn has columns those revisions lack."""
    async with db.engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO turns (conversation_id, seq, role, text, status, prompt_tokens, completion_tokens, "
                 "created_at, updated_at) VALUES (:c, 1, :role, :text, :status, 0, 0, :t, :t)"),
            {"c": conversation_id, "role": role, "text": text_, "status": status, "t": db.now()},
        )  # fmt: skip


def test_upgrade_creates_exactly_the_models_schema(empty_db_url):
    assert migrate.current(empty_db_url) is None
    assert migrate.upgrade(empty_db_url) == migrate.head() == HEAD
    schema = inspect_schema(empty_db_url)
    assert schema["diff"] == []
    assert schema["tables"] == TABLES | {"alembic_version"}
    assert "WHERE" in schema["live_index"].upper() and "archived_at IS NULL" in schema["live_index"]
    assert schema["fks"] == {
        "fk_turns_conversation_id_conversations",
        "fk_turns_image_id_images",
        "fk_usage_ledger_turn_id_turns",
    }
    assert {"uq_images_sha256", "uq_turns_conversation_id_seq", "uq_access_rules_action_target_platform_value"} <= (
        schema["uniques"]
    )


def test_upgrade_downgrade_upgrade_round_trip(empty_db_url):
    migrate.upgrade(empty_db_url)
    assert migrate.downgrade(empty_db_url, "base") is None
    after_down = inspect_schema(empty_db_url)
    assert after_down["tables"] == {"alembic_version"}  # everything the revision made is gone
    assert after_down["live_index"] is None
    assert migrate.upgrade(empty_db_url) == HEAD
    assert inspect_schema(empty_db_url)["diff"] == []


def test_the_comparison_would_notice_a_different_schema(empty_db_url):
    """The schema check is not vacuous: a missing index and column show up as differences."""
    migrate.upgrade(empty_db_url)

    async def damage() -> None:
        engine = create_async_engine(empty_db_url)
        async with engine.begin() as conn:
            await conn.execute(text("DROP INDEX ix_turns_status"))
            await conn.execute(text("ALTER TABLE access_rules DROP COLUMN note"))
        await engine.dispose()

    asyncio.run(damage())
    kinds = {entry[0] if isinstance(entry, tuple) else entry[0][0] for entry in inspect_schema(empty_db_url)["diff"]}
    assert {"add_index", "add_column"} <= kinds


def test_data_survives_a_no_op_re_upgrade(empty_db_url):
    migrate.upgrade(empty_db_url)

    async def write(db: Database) -> int:
        conv = await db.get_or_create_conversation(ThreadRef("slack", "T", "C", "t"))
        await db.add_turns(conv.id, [{"role": "user", "text": "still here"}])
        await db.set_quota("user", "slack", "T", "U", tokens_per_day=5)
        return conv.id

    async def read(db: Database) -> tuple[list[str], int | None]:
        quota = await db.quota_setting("user", "slack", "T", "U")
        return [t.text for t in await db.turns(conv_id)], quota.tokens_per_day if quota else None

    conv_id = _on_db(empty_db_url, write)
    assert migrate.upgrade(empty_db_url) == HEAD
    assert _on_db(empty_db_url, read) == (["still here"], 5)


def test_followed_threads_arrive_in_0002_without_touching_existing_data(empty_db_url):
    """A database made at 0001 (the first release) upgrades in place; a downgrade to 0001 removes only 0002."""
    assert migrate.upgrade(empty_db_url, "0001") == "0001"
    assert "followed_threads" not in inspect_schema(empty_db_url)["tables"]

    async def write(db: Database) -> int:
        conv = await db.get_or_create_conversation(ThreadRef("slack", "T", "C", "t"))
        await _old_turn(db, conv.id, "user", "from 0001", "done")
        return conv.id

    async def follow_and_read(db: Database) -> tuple[bool, list[str]]:
        key = ThreadRef("slack", "T", "C", "t")
        await db.follow_thread(key)
        return await db.is_followed(key), [t.text for t in await db.turns(conv_id)]

    conv_id = _on_db(empty_db_url, write)
    assert migrate.upgrade(empty_db_url) == HEAD
    assert inspect_schema(empty_db_url)["diff"] == []
    assert _on_db(empty_db_url, follow_and_read) == (True, ["from 0001"])
    assert migrate.downgrade(empty_db_url, "0001") == "0001"
    tables = inspect_schema(empty_db_url)["tables"]
    assert "followed_threads" not in tables and "conversations" in tables


def test_workers_arrive_in_0003_and_old_unfinished_answers_have_no_worker(empty_db_url):
    """A database at 0002 upgrades in place: turns gain a ``worker`` column (NULL for old rows, which a start
    then marks interrupted as before), and a downgrade to 0002 removes it again with the data kept."""
    assert migrate.upgrade(empty_db_url, "0002") == "0002"

    async def write(db: Database) -> int:
        conv = await db.get_or_create_conversation(ThreadRef("slack", "T", "C", "t"))
        await _old_turn(db, conv.id, "assistant", "half", "streaming")
        return conv.id

    async def recover(db: Database) -> tuple[int, list[tuple[str, str | None]]]:
        await db.register_worker("w", "h", 1)
        changed = await db.mark_interrupted(live_since=db.now() - timedelta(minutes=1))
        return changed, [(t.status, t.worker) for t in await db.turns(conv_id)]

    conv_id = _on_db(empty_db_url, write)
    assert migrate.upgrade(empty_db_url) == HEAD
    assert inspect_schema(empty_db_url)["diff"] == []
    assert _on_db(empty_db_url, recover) == (1, [("interrupted", None)])
    assert migrate.downgrade(empty_db_url, "0002") == "0002"
    tables = inspect_schema(empty_db_url)["tables"]
    assert "workers" not in tables and "turns" in tables


def test_migration_0005_adds_the_keys_table_and_removes_it_again(empty_db_url: str) -> None:
    assert migrate.upgrade(empty_db_url, "0004") == "0004"
    assert migrate.upgrade(empty_db_url) == "0005"

    async def use(db: Database) -> str:
        _row, key = await db.create_api_key("openai", "w", "u")
        found = await db.verify_api_key("openai", key)
        return found.user_id

    assert _on_db(empty_db_url, use) == "u"
    assert migrate.downgrade(empty_db_url, "0004") == "0004"
    assert migrate.upgrade(empty_db_url) == "0005"


def test_async_variants_run_inside_an_event_loop(empty_db_url):
    async def main() -> tuple[str | None, str | None, str | None]:
        before = await migrate.current_async(empty_db_url)
        up = await migrate.upgrade_async(empty_db_url)
        down = await migrate.downgrade_async(empty_db_url, "base")
        assert before is None
        return up, down, await migrate.upgrade_async(empty_db_url)

    assert asyncio.run(main()) == (HEAD, None, HEAD)
    assert inspect_schema(empty_db_url)["diff"] == []


def _create_all(url: str, drop_column: str | None = None) -> None:
    async def create() -> None:
        db = Database(url)
        await db.create_all()
        if drop_column:
            async with db.engine.begin() as conn:
                await conn.execute(text(f"ALTER TABLE {drop_column}"))
        await db.dispose()

    asyncio.run(create())


def test_processes_starting_together_migrate_one_after_the_other(empty_db_url):
    """Every ``serve`` upgrades at start: several starting at the same moment on a new database must not
    collide (PostgreSQL: an advisory lock around the one-transaction upgrade; SQLite: one writer anyway)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        revisions = list(pool.map(lambda _: migrate.upgrade(empty_db_url), range(4)))
    assert revisions == [HEAD] * 4
    schema = inspect_schema(empty_db_url)
    assert schema["diff"] == [] and schema["tables"] >= TABLES


def test_stamp_records_a_revision_without_running_it(empty_db_url):
    _create_all(empty_db_url)
    assert migrate.current(empty_db_url) is None
    migrate.stamp(empty_db_url)
    assert migrate.current(empty_db_url) == HEAD
    assert migrate.upgrade(empty_db_url) == HEAD  # nothing left to run, nothing fails


def test_upgrade_adopts_tables_made_by_create_all(empty_db_url):
    _create_all(empty_db_url)
    assert migrate.upgrade(empty_db_url) == HEAD
    assert inspect_schema(empty_db_url)["diff"] == []


def test_upgrade_refuses_unversioned_tables_that_differ(empty_db_url):
    _create_all(empty_db_url, drop_column="access_rules DROP COLUMN note")
    with pytest.raises(migrate.SchemaMismatch, match="no migration revision"):
        migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) is None


def test_plain_urls_are_accepted(tmp_path):
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    assert migrate.upgrade(url) == HEAD
    assert migrate.current(f"sqlite+aiosqlite:///{tmp_path / 'plain.db'}") == HEAD


def test_migrations_ship_with_the_package():
    assert migrate.MIGRATIONS_DIR == ROOT / "migrations"
    assert (migrate.MIGRATIONS_DIR / "script.py.mako").is_file()
    assert (migrate.MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "migrations*" in setuptools["packages"]["find"]["include"]
    assert "script.py.mako" in setuptools["package-data"]["migrations"]


def test_missing_postgresql_fails_with_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(pg, "PG_LIB_DIRS", (str(tmp_path),))
    with pytest.raises(pg.PostgresUnavailable, match="apt-get install postgresql"):
        pg.find_pg_bin()
    fake = tmp_path / "13" / "bin"
    fake.mkdir(parents=True)
    for tool in ("initdb", "pg_ctl"):
        (fake / tool).write_text("#!/bin/sh\n")
    assert pg.find_pg_bin() == fake  # found under <lib>/<version>/bin when not on PATH
