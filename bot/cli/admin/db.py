"""``minigpt4-bot admin db upgrade|current|downgrade``: the schema (Alembic migrations in ``migrations/``)."""

from __future__ import annotations

from typing import Annotated

import typer

from bot.cli.admin._common import database_url, describe, fail, safe_url, say, settings_for
from bot.cli.common import ConfigOption

__all__ = ["db_app"]

db_app = typer.Typer(help="The database schema (Alembic migrations).", no_args_is_help=True)


def _errors() -> tuple[type[BaseException], ...]:
    """What a migration command may raise for a database or revision problem (imported lazily)."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from storage import migrate

    return SQLAlchemyError, OSError, TimeoutError, ValueError, CommandError, migrate.SchemaMismatch


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Option("--revision", help="target revision")] = "head",
    config: ConfigOption = None,
) -> None:
    """Create or update the schema on the configured database (safe to run again)."""
    url = database_url(settings_for(config))
    from storage import migrate

    try:
        before = migrate.current(url)
        after = migrate.upgrade(url, revision)
    except _errors() as exc:
        fail(f"Migration failed ({safe_url(url)}): {describe(exc)}")
    if before == after:
        say(f"Database {safe_url(url)} is at revision {after} (nothing to do).")
    else:
        say(f"Database {safe_url(url)} upgraded from {before or 'empty'} to revision {after}.")


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """The schema revision of the configured database and the newest one available."""
    url = database_url(settings_for(config))
    from storage import migrate

    try:
        revision = migrate.current(url)
    except _errors() as exc:
        fail(f"Database error ({safe_url(url)}): {describe(exc)}")
    head = migrate.head()
    state = "up to date" if revision == head else "run `minigpt4-bot admin db upgrade`"
    say(f"Database {safe_url(url)}: revision {revision or 'none'}, newest {head} ({state}).")


def downgrade_target(current: str, revision: str) -> str:
    """The revision a downgrade from ``current`` to ``revision`` ends at (``"base"``: no tables at all).

    ``revision`` is a revision id (or a unique prefix), ``-N`` (N steps down) or ``base``.  Raises
    ``ValueError`` when it is not below ``current`` (Alembic's ``CommandError`` when it is unknown).
    """
    from alembic.script import ScriptDirectory

    from storage import migrate

    script = ScriptDirectory.from_config(migrate.alembic_config())
    below = [*(r.revision for r in script.iterate_revisions(current, "base")), "base"][1:]
    if revision.startswith("-") and revision[1:].isdigit():
        steps = int(revision[1:])
        if not 1 <= steps <= len(below):
            raise ValueError(f"revision {current} is {len(below)} step(s) above base, not {steps}")
        return below[steps - 1]
    found = script.get_revisions(revision)
    target = found[0].revision if found else "base"
    if target != current and target not in below:
        raise ValueError(f"revision {target} is not below the current revision {current} (use `admin db upgrade`)")
    return target


def _confirmed(question: str) -> bool:
    """Ask; no answer at all (stdin closed, Ctrl-C) is a no."""
    try:
        return typer.confirm(question, default=False)
    except typer.Abort:
        return False


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[
        str, typer.Option("--revision", help="target: a revision id, -N (N steps down) or base (drops every table)")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    config: ConfigOption = None,
) -> None:
    """Undo migrations down to a revision, after asking. What they created is dropped, with its data."""
    url = database_url(settings_for(config))
    from storage import migrate

    try:
        current = migrate.current(url)
    except _errors() as exc:
        fail(f"Database error ({safe_url(url)}): {describe(exc)}")
    if current is None:
        say(f"Database {safe_url(url)} has no schema revision (nothing to downgrade).")
        return
    try:
        target = downgrade_target(current, revision)
    except _errors() as exc:
        fail(f"Cannot downgrade to {revision!r}: {exc}", 2)
    if target == current:
        say(f"Database {safe_url(url)} is at revision {current} (nothing to do).")
        return
    effect = "drops every table and all stored data" if target == "base" else f"undoes the migrations after {target}"
    say(f"Database {safe_url(url)}: downgrade from revision {current} to {target} ({effect}).")
    if not yes and not _confirmed("Downgrade now?"):
        say("Nothing changed.")
        raise typer.Exit(1)
    try:
        after = migrate.downgrade(url, target)
    except _errors() as exc:
        fail(f"Migration failed ({safe_url(url)}): {describe(exc)}")
    say(f"Database {safe_url(url)} downgraded from {current} to revision {after or 'base (no tables)'}.")
