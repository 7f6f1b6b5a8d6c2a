"""The data folder is 0700 and the SQLite database with its -wal/-shm files 0600 under umask 022 (issue 26,
item 20): other local users read no conversation or picture.  Checked with os.stat on real files."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.core.config import load_settings
from storage import Database, migrate, sqlite_url
from storage.tables import ImageBlob


@pytest.fixture(autouse=True)
def _umask_022(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MINIGPT4_BOT_DATABASE_URL", raising=False)
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def _write_something(url: str) -> None:
    db = Database(url)
    try:
        await db.add_image(b"picture bytes", "image/png", 1, 1)
        async with db.sessions() as session:  # WAL mode: the -wal and -shm files exist while a connection is open
            assert await session.get(ImageBlob, 1) is not None
            folder = Path(url.partition(":///")[2]).parent
            for name in ("bot.db", "bot.db-wal", "bot.db-shm"):
                assert _mode(folder / name) == 0o600, name
    finally:
        await db.dispose()


def test_serve_makes_the_data_folder_and_the_database_private(tmp_path: Path) -> None:
    from bot.cli.serve import open_database

    config = tmp_path / "bot.toml"
    config.write_text('data_dir = "state"\n')
    settings = load_settings(config)

    async def main() -> None:
        db = await open_database(settings)  # creates the folder, migrates (creating the file), opens it
        try:
            await db.add_image(b"picture bytes", "image/png", 1, 1)
            async with db.sessions() as session:
                assert await session.get(ImageBlob, 1) is not None
                state = tmp_path / "state"
                assert _mode(state) == 0o700
                for name in ("minigpt4-bot.db", "minigpt4-bot.db-wal", "minigpt4-bot.db-shm"):
                    assert _mode(state / name) == 0o600, name
        finally:
            await db.dispose()

    asyncio.run(main())


def test_a_new_database_is_private_however_it_is_first_opened(tmp_path: Path) -> None:
    migrated = sqlite_url(tmp_path / "a" / "bot.db")
    migrate.upgrade(migrated)  # `admin db upgrade` creates the file
    assert _mode(tmp_path / "a") == 0o700 and _mode(tmp_path / "a" / "bot.db") == 0o600
    asyncio.run(_write_something(migrated))
    opened = sqlite_url(tmp_path / "b" / "bot.db")
    db = Database(opened)
    asyncio.run(db.create_all())
    asyncio.run(db.dispose())
    asyncio.run(_write_something(opened))


def test_files_left_open_by_an_older_version_are_tightened(tmp_path: Path) -> None:
    from bot.cli.serve import open_database

    state = tmp_path / "state"
    url = sqlite_url(state / "bot.db")
    state.mkdir(mode=0o755)
    migrate.upgrade(url)
    for name in ("bot.db", "bot.db-wal", "bot.db-shm"):
        (state / name).touch()
        os.chmod(state / name, 0o644)
    os.chmod(state, 0o755)
    config = tmp_path / "bot.toml"
    config.write_text(f'data_dir = "state"\n[database]\nurl = "{url.replace("+aiosqlite", "")}"\n')

    async def main() -> None:
        await (await open_database(load_settings(config))).dispose()

    asyncio.run(main())
    assert _mode(state) == 0o700
    assert all(_mode(state / n) == 0o600 for n in ("bot.db", "bot.db-wal", "bot.db-shm"))


def test_an_existing_folder_the_database_lives_in_is_not_changed(tmp_path: Path) -> None:
    shared = tmp_path / "srv"
    shared.mkdir(mode=0o755)
    url = sqlite_url(shared / "bot.db")
    migrate.upgrade(url)
    assert _mode(shared) == 0o755 and _mode(shared / "bot.db") == 0o600  # /srv stays as it is; the file is ours
