"""The database-URL policy: which URLs the bot accepts, how they map to async drivers, how they are shown.

Storage's concern, in one place: the configuration validates ``[database] url`` with it, ``serve`` and
the admin commands resolve the effective URL with it, and logs print URLs through :func:`hide_password`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote_plus

__all__ = [
    "DATABASE_URL_ENV",
    "SECRET_PARAMS",
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


SECRET_PARAMS = frozenset({"password", "sslpassword"})
"""Query parameters that carry a secret (libpq's, which asyncpg and SQLAlchemy pass on): a password given as
``postgresql://bot@host/db?password=…`` logs in like ``bot:…@host``, so it is treated the same everywhere."""


_USERINFO = re.compile(r"^(?P<user>[^:/]*)(?::(?P<password>[^@]*))?@")
"""``user[:password]@`` at the start of what follows ``://``, read as SQLAlchemy's ``make_url`` reads it (the
password may hold ``/`` or ``?``; an ``@`` in the query after a user without a password is not the host's)."""


def _secret_param(pair: str) -> bool:
    """Whether ``name=value`` sets a secret parameter (names are compared decoded: ``pass%77ord`` too)."""
    return unquote_plus(pair.partition("=")[0]).strip().lower() in SECRET_PARAMS


def has_password(url: str) -> bool:
    """Whether the URL carries a password — ``user:secret@host``, or a secret query parameter
    (:data:`SECRET_PARAMS`: ``?password=…``, ``?sslpassword=…``): never allowed in a config file."""
    _, sep, rest = url.partition("://")
    if not sep:
        return False
    found = _USERINFO.match(rest)
    if found is not None and found.group("password") is not None:
        return True
    query = rest.partition("?")[2].partition("#")[0]
    return any(_secret_param(pair) for pair in query.split("&"))


def hide_password(url: str) -> str:
    """The URL with every password replaced by ``***`` — the user info's and each secret query parameter's:
    the one rendering of a database URL for logs, messages and the admin commands."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    found = _USERINFO.match(rest)
    if found is not None and found.group("password") is not None:
        rest = f"{found.group('user')}:***@{rest[found.end() :]}"
    base, mark, query = rest.partition("?")
    if mark:
        query, hash_, fragment = query.partition("#")
        pairs = [f"{pair.partition('=')[0]}=***" if _secret_param(pair) else pair for pair in query.split("&")]
        rest = f"{base}?{'&'.join(pairs)}{hash_}{fragment}"
    return f"{scheme}://{rest}"


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
