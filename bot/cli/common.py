"""What every command shares: the ``--config`` option, loading settings with logging, the two consoles.

Text that comes from outside the program (configuration errors, paths, exception messages, user
input) is never printed as rich markup: rich would read ``[model]`` as a style and drop it, and
``[/INST]`` would raise.  Print it as ``rich.text.Text``, with ``markup=False``, or escaped.

Logging: at ``log_level = "INFO"`` (the default) a start shows a handful of lines — the model, the
database, each front end and where it listens, and warnings that need action.  This project's loggers
(and those of installed front-end and backend plugins) show the configured level; every other library
(alembic, aiohttp, asyncio, httpx, slack_bolt …) only WARNING and above, unless ``log_level = "DEBUG"``,
which shows everything.

Where the log goes: on a terminal, rich's columns; to a file or pipe (Docker, systemd), one line per record
— ``2026-01-31T12:00:00.123+00:00 INFO bot.core.service: message`` — never wrapped or padded, a traceback
folded into the same line; with ``log_format = "json"``, one JSON object per line.  The messages are the
same either way (database URLs already pass through ``storage.url.hide_password``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from bot.core.config import ConfigError, Settings, load_settings
from bot.core.plugins import BACKENDS, FRONTENDS

__all__ = [
    "FIRST_PARTY_LOGGERS", "ConfigOption", "JsonFormatter", "OneLineFormatter", "ThirdPartyFilter", "configure_logging",
    "err", "log", "log_handler", "out", "own_loggers", "setup",
]  # fmt: skip

out = Console()
err = Console(stderr=True)
log = logging.getLogger("minigpt4_bot")

FIRST_PARTY_LOGGERS = ("minigpt4_bot", "bot", "adapters", "storage", "model")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="bot.toml to use (default: $MINIGPT4_BOT_CONFIG or ./bot.toml)")
]


def setup(config: Path | None) -> Settings:
    """Load bot.toml (exit 2 with the reasons when it is invalid) and configure logging from it."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        err.print(Text(str(exc), style="red"))  # literally: messages quote tables such as [model]
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def own_loggers() -> set[str]:
    """Top-level logger names that log at the configured level: this project's and its plugins' packages."""
    names = set(FIRST_PARTY_LOGGERS)
    for group in (FRONTENDS, BACKENDS):
        names |= {ep.module.partition(".")[0] for ep in entry_points(group=group)}  # metadata only, no import
    return names


class ThirdPartyFilter(logging.Filter):
    """Passes this project's records at any level and other libraries' at WARNING and above."""

    def __init__(self, own: set[str]) -> None:
        super().__init__()
        self.own = frozenset(own)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.partition(".")[0] in self.own


def _iso_time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class OneLineFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: message`` on one line (ISO-8601 time with the zone); line breaks as ``\\n``."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        line = f"{_iso_time(record)} {record.levelname} {record.name}: {text}"
        return line.replace("\r", "").replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO-8601 with zone), ``level``, ``logger``, ``message``, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _iso_time(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}  # fmt: skip
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def log_handler(log_format: str = "text") -> logging.Handler:
    """The stderr handler: rich's columns only for a terminal; one line (or one JSON object) per record else."""
    if log_format == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif err.is_terminal:
        handler = RichHandler(console=err, show_path=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLineFormatter())
    return handler


def configure_logging(level: str, log_format: str = "text") -> None:
    """One handler on stderr at ``level``; other libraries' records only from WARNING up, unless ``level`` is DEBUG.

    The filter sits on the handler, so no logger's own level changes (tests that capture logs see everything).
    """
    handler = log_handler(log_format)
    if logging.getLevelName(level) > logging.DEBUG:
        handler.addFilter(ThirdPartyFilter(own_loggers()))
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
