"""``admin db …`` (upgrade, downgrade, current) and how the admin commands find and reach their database."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import Env, numbers, runner, upgrade, write_config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from bot.cli.main import app
from storage import migrate
from storage.tables import Base
from tests.http_helpers import closed_port
from tests.pg import create_database

# ---------------------------------------------------------------------------- db


def test_db_upgrade_creates_the_schema_and_is_idempotent(request: pytest.FixtureRequest, tmp_path: Path, backend):
    config, _url = _fresh_config(request, tmp_path, backend)
    args = ["admin", "db", "current", "--config", str(config)]
    before = runner.invoke(app, args)
    assert before.exit_code == 0 and "revision none" in before.output
    first = upgrade(config)
    head = migrate.head()
    assert f"upgraded from empty to revision {head}" in first.output
    again = upgrade(config)
    assert f"at revision {head} (nothing to do)" in again.output
    after = runner.invoke(app, args)
    assert f"revision {head}, newest {head} (up to date)" in after.output


def _fresh_config(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> tuple[Path, str]:
    """A bot.toml for a new, empty database, and that database's async URL."""
    if backend == "sqlite":
        return write_config(tmp_path, f"sqlite:///{tmp_path / 'fresh.db'}"), f"sqlite+aiosqlite:///{tmp_path}/fresh.db"
    url = create_database(request.getfixturevalue("postgres_url"), f"fresh_{next(numbers)}")
    return write_config(tmp_path, url), url


def _tables(url: str) -> set[str]:
    async def names() -> set[str]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
        finally:
            await engine.dispose()

    return asyncio.run(names()) & {t.name for t in Base.metadata.sorted_tables}


def test_db_downgrade_to_base_asks_first_then_drops_the_tables(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
):
    config, url = _fresh_config(request, tmp_path, backend)
    every_table = {t.name for t in Base.metadata.sorted_tables}
    upgrade(config)
    assert _tables(url) == every_table
    head = migrate.head()
    args = ["admin", "db", "downgrade", "--revision", "base", "--config", str(config)]

    declined = runner.invoke(app, args, input="n\n")
    assert declined.exit_code == 1, declined.output
    assert f"downgrade from revision {head} to base (drops every table and all stored data)" in declined.output
    assert "Nothing changed." in declined.output
    assert _tables(url) == every_table
    unanswered = runner.invoke(app, args)  # no terminal to answer on: refused as well
    assert unanswered.exit_code == 1 and _tables(url) == every_table

    confirmed = runner.invoke(app, args, input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert f"downgraded from {head} to revision base (no tables)" in confirmed.output
    assert _tables(url) == set()
    current = runner.invoke(app, ["admin", "db", "current", "--config", str(config)])
    assert "revision none" in current.output
    nothing = runner.invoke(app, args)
    assert nothing.exit_code == 0 and "nothing to downgrade" in nothing.output

    again = upgrade(config)
    assert f"upgraded from empty to revision {head}" in again.output
    assert _tables(url) == every_table


def test_db_downgrade_by_steps_with_yes_and_bad_targets(request: pytest.FixtureRequest, tmp_path: Path, backend: str):
    config, url = _fresh_config(request, tmp_path, backend)
    upgrade(config)
    head = migrate.head()

    def downgrade(*args: str) -> Any:
        return runner.invoke(app, ["admin", "db", "downgrade", *args, "--config", str(config)])

    unknown = downgrade("--revision", "nosuchrevision", "--yes")
    assert unknown.exit_code == 2 and "Cannot downgrade to 'nosuchrevision'" in unknown.output
    same = downgrade("--revision", head, "--yes")
    assert same.exit_code == 0 and f"at revision {head} (nothing to do)" in same.output
    too_far = downgrade("--revision", "-99", "--yes")
    assert too_far.exit_code == 2

    steps = [r.revision for r in ScriptDirectory.from_config(migrate.alembic_config()).walk_revisions()]
    below = steps[1] if len(steps) > 1 else "base"
    one_down = downgrade("--revision", "-1", "--yes")  # --yes: no question asked
    assert one_down.exit_code == 0, one_down.output
    assert f"downgrade from revision {head} to {below}" in one_down.output and "Downgrade now?" not in one_down.output
    assert migrate.current(url) == (None if below == "base" else below)
    if below != "base":
        up = downgrade("--revision", head, "--yes")
        assert up.exit_code == 2 and "not below the current revision" in up.output
    assert upgrade(config).exit_code == 0 and migrate.current(url) == head


# ---------------------------------------------------------------------------- configuration and errors


def test_environment_url_overrides_the_file(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    other = tmp_path / "other"
    other_config = write_config(other, "sqlite:///other.db")
    upgrade(other_config)
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", env.url.replace("+asyncpg", "").replace("+aiosqlite", ""))
    result = runner.invoke(app, ["admin", "allow", "user", "UX", "-p", "slack", "--config", str(other_config)])
    assert result.exit_code == 0
    assert [r.value for r in env.db(lambda db: db.rules())] == ["UX"]  # written to the env's database


def test_bad_urls_and_unreachable_databases_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bad_scheme = write_config(tmp_path / "a", "mysql://bot@db/minigpt4")
    result = runner.invoke(app, ["admin", "list", "--config", str(bad_scheme)])
    assert result.exit_code == 2 and "unsupported database URL scheme 'mysql'" in result.output

    secret = write_config(tmp_path / "b", "postgresql://bot:hunter2@db/minigpt4")
    result = runner.invoke(app, ["admin", "list", "--config", str(secret)])
    assert result.exit_code == 2 and "MINIGPT4_BOT_DATABASE_URL" in result.output
    assert "hunter2" not in result.output

    plain = write_config(tmp_path / "c", "")
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", "not a url")
    result = runner.invoke(app, ["admin", "usage", "--config", str(plain)])
    assert result.exit_code == 2 and "not a database URL" in result.output

    port = closed_port()
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", f"postgresql://bot:s3cret@127.0.0.1:{port}/minigpt4")
    for args in (["list"], ["db", "upgrade"], ["db", "current"]):
        result = runner.invoke(app, ["admin", *args, "--config", str(plain)])
        assert result.exit_code == 1, (args, result.output)
        assert "cannot connect" in result.output and f"127.0.0.1:{port}" in result.output
        assert "s3cret" not in result.output  # the password is never printed

    monkeypatch.delenv("MINIGPT4_BOT_DATABASE_URL")
    result = runner.invoke(app, ["admin", "usage", "--config", str(plain)])  # default SQLite file, no schema yet
    assert result.exit_code == 1 and "admin db upgrade" in result.output
    assert (tmp_path / "c" / "state" / "minigpt4-bot.db").is_file()  # <data_dir>/minigpt4-bot.db


def test_missing_schema_on_postgres_points_at_upgrade(postgres_url: str, tmp_path: Path):
    url = create_database(postgres_url, f"noschema_{next(numbers)}")
    config = write_config(tmp_path, url)
    result = runner.invoke(app, ["admin", "quota", "show", "--config", str(config)])
    assert result.exit_code == 1 and "admin db upgrade" in result.output


def test_outside_the_project_folder_it_says_no_bot_toml_was_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINIGPT4_BOT_CONFIG", raising=False)
    result = runner.invoke(app, ["admin", "db", "upgrade"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "No bot.toml found" in said and str(tmp_path / "data" / "minigpt4-bot.db") in said


def test_an_unknown_platform_gets_a_warning_naming_the_known_ones(env: Env):
    result = env.run("usage", "-p", "nonsense")
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "no front end is called 'nonsense'" in said and "terminal" in said and "web" in said
