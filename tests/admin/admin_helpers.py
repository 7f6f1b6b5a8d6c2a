"""What the ``minigpt4-bot admin …`` tests share (tests/admin/conftest.py gives them the ``env`` fixture): a
bot.toml pointing at a migrated database, the typer runner, and the pinned clock's "now".

Each test writes a bot.toml with ``[database] url = …`` in a temp folder; the schema is made by
``admin db upgrade`` itself.  Data is seeded and checked with ``storage.Database`` directly.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from bot.cli.main import app
from storage import Database

runner = CliRunner()
numbers = itertools.count()
# The admin commands read the database's clock (wall-clock UTC); it is pinned mid-day so that "today" in the
# seeded data and in the command's windows are the same day whatever the date the suite runs.
NOW = datetime(2026, 7, 15, 12, 0, tzinfo=UTC)
TODAY = NOW.replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass
class Env:
    """A bot.toml pointing at a migrated database, and that database's async URL."""

    config: Path
    url: str
    backend: str

    def run(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
        return runner.invoke(app, ["admin", *args, "--config", str(self.config)], input=input, env=env)

    def db(self, fn: Callable[[Database], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            db = Database(self.url)
            try:
                return await fn(db)
            finally:
                await db.dispose()

        return asyncio.run(main())


def write_config(folder: Path, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bot.toml"
    path.write_text(f'data_dir = "state"\n\n[database]\nurl = "{url}"\n')
    return path


def upgrade(config: Path) -> Any:
    result = runner.invoke(app, ["admin", "db", "upgrade", "--config", str(config)])
    assert result.exit_code == 0, result.output
    return result
