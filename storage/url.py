"""The database-URL policy: which URLs the bot accepts, how they map to async drivers, how they are shown.

Storage's concern, in one place: the configuration validates ``[database] url`` with it, ``serve`` and
the admin commands resolve the effective URL with it, and logs print URLs through :func:`hide_password`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "DATABASE_URL_ENV",
    "SQLITE_FILE",
    "DatabaseURLError",
    "effective_database_url",
    "has_password",
    "hide_password",
    "normalize_database_url",
    "resolve_sqlite_path",
    "sqlite_url",
]

DATABASE_URL_ENV = "MINIGPT4_BOT_DATABASE_URL"  # the only place a password may come from
SQLITE_FILE = "minigpt4-bot.db"


class DatabaseURLError(ValueError):
    """Not an SQLite or PostgreSQL URL; the message says what is accepted (passwords hidden)."""


def sqlite_url(path: str | Path) -> str:
    return f"sqlite+aiosqlite:///{Path(path).expanduser()}"


def normalize_database_url(url: str) -> str:
    """The async-driver form of a database URL (``postgresql://`` → asyncpg, ``sqlite:///`` → aiosqlite)."""
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        raise DatabaseURLError(
            f"not a database URL: {hide_password(url)!r} (use sqlite:///PATH or postgresql://HOST/DB)"
        )
    scheme = scheme.lower()
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        return f"postgresql+asyncpg://{rest}"
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return f"sqlite+aiosqlite://{rest}"
    raise DatabaseURLError(
        f"unsupported database URL scheme {scheme!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB "
        "(the bot uses the aiosqlite and asyncpg drivers)"
    )


def has_password(url: str) -> bool:
    """Whether the URL carries a password (``user:secret@host``): never allowed in a config file."""
    credentials = url.partition("://")[2].rpartition("@")[0]
    return ":" in credentials


def hide_password(url: str) -> str:
    """The URL with any password replaced by ``***``, safe for logs and messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if sep and at and ":" in credentials:
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url


def resolve_sqlite_path(url: str, base: Path) -> str:
    """``sqlite:///relative.db`` in a config file is relative to the file's folder, like every other path."""
    scheme, sep, path = url.partition(":///")
    if not sep or not scheme.lower().startswith("sqlite") or not path or path.startswith(":memory:"):
        return url
    if Path(path).expanduser().is_absolute():
        return url
    return f"{scheme}:///{base / path}"


def effective_database_url(configured: str, data_dir: str | Path, environ: Mapping[str, str] = os.environ) -> str:
    """``$MINIGPT4_BOT_DATABASE_URL``, else the configured URL, else ``<data_dir>/minigpt4-bot.db`` (async form)."""
    url = environ.get(DATABASE_URL_ENV, "").strip() or configured
    if not url:
        return sqlite_url(Path(data_dir).expanduser() / SQLITE_FILE)
    return normalize_database_url(url)
