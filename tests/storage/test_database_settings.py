"""``[database]`` in bot.toml and ``$MINIGPT4_BOT_DATABASE_URL``: the effective async URL."""

from __future__ import annotations

import pytest

from bot.core.config import ConfigError, Settings, load_settings
from storage.url import DatabaseURLError, normalize_database_url


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINIGPT4_BOT_DATABASE_URL", raising=False)
    monkeypatch.delenv("MINIGPT4_BOT_CONFIG", raising=False)


def _load(tmp_path, body: str) -> Settings:
    path = tmp_path / "conf" / "bot.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(body)
    return load_settings(path)


def test_default_is_an_sqlite_file_in_the_data_dir(tmp_path):
    settings = _load(tmp_path, 'data_dir = "var"\n')
    assert settings.database.url == ""
    assert settings.database_url() == f"sqlite+aiosqlite:///{tmp_path / 'conf' / 'var' / 'minigpt4-bot.db'}"
    assert Settings().database_url().endswith("data/minigpt4-bot.db")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://bot@db:5432/minigpt4", "postgresql+asyncpg://bot@db:5432/minigpt4"),
        ("postgres://bot@db/minigpt4", "postgresql+asyncpg://bot@db/minigpt4"),
        ("postgresql+asyncpg://bot@db/minigpt4", "postgresql+asyncpg://bot@db/minigpt4"),
        ("sqlite:////srv/bot.db", "sqlite+aiosqlite:////srv/bot.db"),
        ("sqlite+aiosqlite:////srv/bot.db", "sqlite+aiosqlite:////srv/bot.db"),
        ("  postgresql://u:p%40ss@h/d  ", "postgresql+asyncpg://u:p%40ss@h/d"),
    ],
)
def test_urls_are_rewritten_for_the_async_drivers(given, expected):
    assert normalize_database_url(given) == expected


@pytest.mark.parametrize("bad", ["mysql://u@h/d", "postgresql+psycopg2://u@h/d", "bot.db", "sqlite://", ""])
def test_other_urls_are_refused(bad):
    with pytest.raises(DatabaseURLError, match="database URL"):
        normalize_database_url(bad)


def test_file_url_relative_to_the_config_file(tmp_path):
    settings = _load(tmp_path, '[database]\nurl = "sqlite:///state/bot.db"\n')
    assert settings.database_url() == f"sqlite+aiosqlite:///{tmp_path / 'conf' / 'state' / 'bot.db'}"
    absolute = _load(tmp_path, '[database]\nurl = "sqlite:////srv/bot.db"\n')
    assert absolute.database_url() == "sqlite+aiosqlite:////srv/bot.db"
    postgres = _load(tmp_path, '[database]\nurl = "postgresql://bot@db/minigpt4"\n')
    assert postgres.database_url() == "postgresql+asyncpg://bot@db/minigpt4"


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    settings = _load(tmp_path, '[database]\nurl = "sqlite:///state/bot.db"\n')
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", "postgresql://bot:secret@db/minigpt4")
    assert settings.database_url() == "postgresql+asyncpg://bot:secret@db/minigpt4"
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", "oracle://x@y/z")
    with pytest.raises(ConfigError, match="unsupported database URL scheme 'oracle'"):
        settings.database_url()
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", "  ")  # blank = not set
    assert settings.database_url().endswith("conf/state/bot.db")


def test_passwords_and_bad_urls_in_bot_toml_are_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, '[database]\nurl = "postgresql://bot:hunter2@db/minigpt4"\n')
    assert "database.url" in str(info.value) and "MINIGPT4_BOT_DATABASE_URL" in str(info.value)
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match=r"database\.url.*unsupported database URL scheme 'mysql'"):
        _load(tmp_path, '[database]\nurl = "mysql://bot@db/minigpt4"\n')
    with pytest.raises(ConfigError, match=r"database\.colour"):
        _load(tmp_path, '[database]\ncolour = "blue"\n')
