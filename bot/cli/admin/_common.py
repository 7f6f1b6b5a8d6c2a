"""What every admin command shares: opening the configured database, failing cleanly, printing literally.

Database problems (bad URL, server down, schema missing) print one clear line on stderr and exit
with status 1; a bad URL in the configuration exits with status 2.  Nothing printed here is parsed
as rich markup: ids, notes and message text are shown exactly as stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.table import Column, Table
from rich.text import Text

from bot.cli.common import err, out, setup
from bot.core.config import ConfigError, Settings

if TYPE_CHECKING:
    from storage import Database

T = TypeVar("T")

NO_SCHEMA_HINT = "the database has no tables yet: run `minigpt4-bot admin db upgrade`"
CUT_FLOOR = 6  # a cut cell keeps at least this many characters, "…" included
WIDE_HELP = "every cell whole, however wide the table gets (for a pager or a file); default: fit the terminal"


def known_platform(value: str | None) -> str | None:
    """Warn (and go on) when ``--platform`` names no installed front end: a typo would match nothing."""
    from bot.core.plugins import FRONTENDS, plugin_names

    known = plugin_names(FRONTENDS)
    if value is not None and value not in known:
        err.print(Text(f"warning: no front end is called {value!r} (known platforms: {', '.join(known)})",
                       style="yellow"), soft_wrap=True)  # fmt: skip
    return value


PlatformOption = Annotated[
    str, typer.Option("--platform", "-p", help="slack | discord | web | terminal …", callback=known_platform)
]
WorkspaceOption = Annotated[str, typer.Option("--workspace", "-w", help="Slack team / Discord guild id")]
UserOption = Annotated[str | None, typer.Option("--user", "-u", help="user id (omit for the workspace limits)")]


def settings_for(config: Path | None) -> Settings:
    """bot.toml, loaded as every command does, with Alembic's step-by-step INFO logging quietened."""
    settings = setup(config)
    from bot.core.config import find_config

    if find_config(config) is None:  # run outside the project folder: say where the data goes
        err.print(Text(f"No bot.toml found (--config, $MINIGPT4_BOT_CONFIG or ./bot.toml): using the built-in "
                       f"defaults and the database {safe_url(settings.database_url())}", style="yellow"),
                  soft_wrap=True)  # fmt: skip
    # Alembic logs every plugin and step at INFO; the commands print their own one-line summary.
    logging.getLogger("alembic").setLevel(logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING)
    return settings


def fail(message: str, code: int = 1) -> NoReturn:
    """One red line on stderr, printed literally, then exit with ``code``."""
    err.print(Text(message, style="red"), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def safe_url(url: str) -> str:
    """The URL with its passwords hidden, in the user info and in the query (``?password=…``):
    :func:`storage.url.hide_password`, the one rendering of a database URL."""
    from storage.url import hide_password

    return hide_password(url)


def database_url(settings: Settings) -> str:
    """The configured database URL (exit 2 when it is bad); an SQLite file's folder is created."""
    try:
        url = settings.database_url()
    except ConfigError as exc:
        fail(f"Bad database URL: {exc}", code=2)
    if url.startswith("sqlite") and ":memory:" not in url:
        Path(url.partition(":///")[2]).expanduser().parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return url


def describe(exc: BaseException) -> str:
    """One line for a database error, with a hint where there is an obvious fix."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()[0] if str(original).strip() else type(original).__name__
    lowered = str(exc).lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"{NO_SCHEMA_HINT} ({text})"
    if isinstance(original, OSError | TimeoutError) or "connect" in lowered:
        return f"cannot connect: {text}"
    return text


def run(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    """Open the configured database, run ``work(db)``, close it; database errors end the command cleanly."""
    from sqlalchemy.exc import SQLAlchemyError

    from storage import Database

    url = database_url(settings)

    async def main() -> T:
        async with Database(url) as db:
            return await work(db)

    try:
        return asyncio.run(main())
    except (SQLAlchemyError, OSError, TimeoutError, ValueError) as exc:
        fail(f"Database error ({safe_url(url)}): {describe(exc)}")


def say(message: RenderableType) -> None:
    """A table, or a line of plain text (never parsed as markup, never hard-wrapped) on stdout."""
    if isinstance(message, str):
        out.print(message, markup=False, highlight=False, soft_wrap=True)
    else:
        out.print(message)


def table(title: str | None, columns: Iterable[str], *, right: Iterable[str] = (), fold: bool = False) -> Table:
    """A table with a plain-text title; the ``right`` columns are right-aligned, ``fold`` wraps long cells."""
    made = Table(title=Text(title) if title is not None else None)
    right = set(right)
    for column in columns:
        made.add_column(column, justify="right" if column in right else "left", overflow="fold" if fold else "ellipsis")
    return made


def _natural_width(column: Column) -> int:
    """The widest line of the column's header and cells (a header may have two lines)."""
    texts = [str(column.header), *(str(cell) for cell in column.cells)]
    return max((cell_len(line) for text in texts for line in text.splitlines()), default=1)


def _without(shown: Table, names: Iterable[str]) -> Table:
    """A copy of ``shown`` without the columns ``names`` (headers), rows and sections kept."""
    gone = set(names)
    kept = [column for column in shown.columns if column.header not in gone]
    made = Table(title=shown.title)
    for column in kept:
        made.add_column(column.header, justify=column.justify)
    cells = [list(column.cells) for column in kept]
    for index, row in enumerate(shown.rows):
        made.add_row(*(column[index] for column in cells), end_section=row.end_section)
    return made


def show_table(
    shown: Table, *, cut: Sequence[str | tuple[str, ...]] = (), optional: Sequence[str] = (), wide: bool = False
) -> None:
    """Print ``shown`` with one line per row: no cell wraps or folds, so a row never spans two lines.

    It fits the terminal (``COLUMNS``; 80 on a pipe).  When the table is too wide, the ``optional`` columns
    (the least needed: an update day) are left out first, then the ``cut`` columns — long ids and free
    text — are narrowed, down to :data:`CUT_FLOOR` characters, their cells ending in "…": the first entry
    first, the columns of a tuple entry together (the widest first).  Every other column (numbers, dates,
    short names) keeps its width.  ``wide`` (the commands' ``--wide``) prints every column and every cell
    whole however wide the table gets, so nothing is lost to a narrow terminal.
    """
    natural = {column.header: _natural_width(column) for column in shown.columns}
    chrome = 3 * len(shown.columns) + 1  # "│ " before each cell, " " after it, the last "│"
    if not wide and sum(natural.values()) + chrome > out.width and optional:
        shown = _without(shown, optional)
        natural = {column.header: _natural_width(column) for column in shown.columns}
        chrome = 3 * len(shown.columns) + 1
    groups = [(entry,) if isinstance(entry, str) else entry for entry in cut]
    cuttable = {name for group in groups for name in group}
    for column in shown.columns:
        column.no_wrap, column.overflow = True, "ellipsis"
        column.min_width = None if column.header in cuttable and not wide else natural[column.header]
    total = sum(natural.values()) + chrome
    if wide:  # out.print(width=) cannot go past the terminal's width: a console as wide as the table can
        Console(file=out.file, width=max(out.width, total), force_terminal=out.is_terminal).print(shown)
        return
    widths, excess = dict(natural), total - out.width
    for group in groups:
        while excess > 0 and widths[name := max(group, key=widths.__getitem__)] > CUT_FLOOR:
            widths[name], excess = widths[name] - 1, excess - 1
    for column in shown.columns:
        if widths[column.header] < natural[column.header]:
            column.width = widths[column.header]
    out.print(shown)


def add_row(table: Table, *cells: object) -> None:
    """A table row of plain text: stored values (notes, message text) are never parsed as markup."""
    table.add_row(*(Text(str(cell)) for cell in cells))


def when(value: datetime | None) -> str:
    """A stored time as ``YYYY-MM-DD HH:MM`` UTC (``-`` when unset)."""
    if value is None:
        return "-"
    from storage import as_utc

    return as_utc(value).strftime("%Y-%m-%d %H:%M")
