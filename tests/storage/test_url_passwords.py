"""A password in a database URL's query string (``?password=…``, ``?sslpassword=…``) is a password like
``user:secret@host`` (issue 26, item 16): refused in bot.toml, hidden wherever the URL is shown — serve's
database line, the admin commands, their connection errors."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli.main import app
from bot.core.config import ConfigError, load_settings
from storage.url import has_password, hide_password
from tests.http_helpers import closed_port

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINIGPT4_BOT_DATABASE_URL", raising=False)
    monkeypatch.delenv("MINIGPT4_BOT_CONFIG", raising=False)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bot@db/bot?password=hunter2", "postgresql://bot@db/bot?password=***"),
        ("postgresql://bot@db/bot?sslmode=require&PassWord=p@ss&x=1", "postgresql://bot@db/bot?sslmode=require&PassWord=***&x=1"),
        ("postgresql://bot@db/bot?sslpassword=hunter2#f", "postgresql://bot@db/bot?sslpassword=***#f"),
        ("postgresql://bot@db/bot?pass%77ord=hunter2", "postgresql://bot@db/bot?pass%77ord=***"),
        ("postgresql://db?password=hunter2@x", "postgresql://db?password=***"),
        ("postgresql://bot:hunter2@db:5432/bot?application_name=x", "postgresql://bot:***@db:5432/bot?application_name=x"),
        ("postgresql://bot:hun/ter?2@db/bot", "postgresql://bot:***@db/bot"),
    ],
)  # fmt: skip
def test_every_password_is_a_password_and_is_hidden(url: str, shown: str) -> None:
    assert has_password(url) and hide_password(url) == shown


@pytest.mark.parametrize(
    "url", ["postgresql://bot@db/bot", "postgresql://bot@db/bot?application_name=password", "sqlite:///x.db?mode=ro"]
)
def test_urls_without_a_password_are_shown_as_they_are(url: str) -> None:
    assert not has_password(url) and hide_password(url) == url


def test_a_query_string_password_in_bot_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bot.toml"
    for url in ("postgresql://bot@db/bot?password=hunter2", "postgresql://bot@db/bot?sslpassword=hunter2"):
        path.write_text(f'[database]\nurl = "{url}"\n')
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert "MINIGPT4_BOT_DATABASE_URL" in str(info.value) and "hunter2" not in str(info.value)


def test_admin_commands_hide_a_query_string_password(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "bot.toml"
    config.write_text('data_dir = "state"\n')
    working = postgres_url.replace("postgresql+asyncpg://", "postgresql://") + "?password=s3cret"
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", working)  # the test cluster trusts local logins
    result = runner.invoke(app, ["admin", "db", "current", "--config", str(config)])
    assert result.exit_code == 0 and "password=***" in result.output, result.output
    assert "s3cret" not in result.output

    port = closed_port()
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", f"postgresql://bot@127.0.0.1:{port}/bot?password=s3cret")
    for args in (["list"], ["db", "upgrade"], ["db", "current"]):
        result = runner.invoke(app, ["admin", *args, "--config", str(config)])
        assert result.exit_code == 1 and "cannot connect" in result.output, (args, result.output)
        assert "s3cret" not in result.output and "password=***" in result.output


def test_serve_database_line_hides_a_query_string_password(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from bot.cli.serve import open_database

    config = tmp_path / "bot.toml"
    config.write_text('data_dir = "state"\n')
    url = postgres_url.replace("postgresql+asyncpg://", "postgresql://") + "?password=s3cret"
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", url)
    settings = load_settings(config)

    async def main() -> None:
        db = await open_database(settings)
        await db.dispose()

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert "password=***" in caplog.text and "s3cret" not in caplog.text
