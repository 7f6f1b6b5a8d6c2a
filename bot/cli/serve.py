"""The composition root: settings → database → generation backend → bot core → front ends.

``serve`` runs until a signal (or until the terminal chat ends when it is the only front end).  It
names no platform and no backend: both come from the plugin registry (:mod:`bot.core.plugins`) by the
names ``bot.toml`` enables, so a new front end or backend is a new package, not an edit here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.cli.backends import engine_config, load_model
from bot.core.backend_api import BackendPlugin
from bot.core.config import ConfigError, Settings
from bot.core.frontend_api import FrontEnd, FrontEndContext, FrontEndPlugin, FrontEndSetupError
from bot.core.plugins import BACKENDS, FRONTENDS, load_plugin, plugin_names
from bot.core.service import BotService
from bot.core.workers import HEARTBEAT_S
from storage import Database

if TYPE_CHECKING:
    from model import MiniGPT4

__all__ = ["engine_config", "load_model", "open_database", "run_bot"]

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 24 * 3600


DB_CHECK_TIMEOUT_S = 10.0


async def database_problem(settings: Settings) -> str | None:
    """One line saying why the configured database cannot be used, else None.

    ``serve`` and ``chat`` ask this before loading the model, so an unreachable server (or a bad URL)
    is one clear line in seconds — not a driver traceback after minutes of loading weights.
    """
    from storage.url import hide_password

    try:
        url = settings.database_url()
    except ConfigError as exc:
        return f"database: {exc}"
    shown = hide_password(url)
    db = Database(url)
    try:
        if url.startswith("sqlite"):
            Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        await db.ping(timeout=DB_CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"the database {shown} did not answer within {DB_CHECK_TIMEOUT_S:.0f} s"
    except Exception as exc:  # the driver's error (refused, unknown host, bad login, unreadable file)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return f"cannot use the database {shown}: {reason} ({type(exc).__name__})"
    finally:
        await db.dispose()
    return None


def front_end_problems(settings: Settings, *, interactive: bool = False) -> list[str]:
    """What the enabled front ends lack from their surroundings (a token not in the environment), one line
    each: ``serve`` asks before loading the model, as it asks :func:`database_problem`."""
    context = FrontEndContext(interactive=interactive, data_dir=Path(settings.data_dir))
    problems = []
    for plugin, table in _enabled_front_ends(settings, context, None):
        problem = plugin.check(table)
        if problem:
            problems.append(f"{plugin.name}: {problem} (see {plugin.docs})")
    return problems


async def open_database(settings: Settings) -> Database:
    """Open the configured database and bring its schema up to date (Alembic); logs one line about it."""

    from storage.migrate import current_async, upgrade_async
    from storage.private import private_dir
    from storage.url import hide_password

    private_dir(settings.data_dir)  # 0700: every conversation and picture is in it
    url = settings.database_url()
    before = await current_async(url)
    after = await upgrade_async(url)
    change = "" if before == after else f", upgraded from {before}" if before else ", created"
    log.info("database %s (schema %s%s)", hide_password(url), after, change)
    return Database(url)


async def _prune_daily(service: BotService) -> None:
    """Keep the redelivery table small: prune at start, then once a day."""
    while True:
        try:
            await service.prune_events()
        except Exception:  # a database blip must not end the bot; try again tomorrow
            log.exception("pruning processed events failed")
        await asyncio.sleep(PRUNE_EVERY_S)


async def _heartbeat(service: BotService) -> None:
    """This process's heartbeat, and the sweep for answers of processes that stopped (bot.core.workers)."""
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        try:
            await service.heartbeat()
        except Exception as exc:  # a database blip: /readyz reports it; the next beat tries again
            log.warning("heartbeat failed: %r", exc)


def _interrupted_an_answer(running: Collection[FrontEnd]) -> bool:
    """Offer Ctrl-C to the front ends that take it (the terminal chat's optional ``interrupt()``): True
    when one stopped an answer with it — then Ctrl-C ends that answer, not the bot."""
    for front_end in running:
        interrupt = getattr(front_end, "interrupt", None)
        if callable(interrupt) and interrupt():
            return True
    return False


def _enabled_front_ends(
    settings: Settings, context: FrontEndContext, only: Collection[str] | None
) -> list[tuple[FrontEndPlugin, Any]]:
    chosen = []
    for name in plugin_names(FRONTENDS):
        if only is not None and name not in only:
            continue
        plugin: FrontEndPlugin = load_plugin(FRONTENDS, name)
        table = settings.frontend(name)
        if only is not None or plugin.enabled(table, context):
            chosen.append((plugin, table))
    return sorted(chosen, key=lambda pair: (pair[0].start_order, pair[0].name))


async def run_bot(
    settings: Settings,
    *,
    terminal: bool | None = None,
    model: MiniGPT4 | None = None,
    only: Collection[str] | None = None,
) -> int:
    """Start everything configured and run until a signal (or the last front end) ends it; the exit status.

    ``terminal`` overrides whether this is an interactive session (default: stdin is a terminal);
    ``only`` starts just those front ends, whatever bot.toml enables; ``model`` is an already
    loaded model for the local backend.
    """
    db = await open_database(settings)
    backend_plugin: BackendPlugin = load_plugin(BACKENDS, settings.engine.backend)
    backend = await backend_plugin.start(settings, model=model)
    service = BotService(settings, db, backend)
    await service.recover()
    housekeeping = asyncio.gather(_prune_daily(service), _heartbeat(service))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    running: list[FrontEnd] = []
    ended: set[str] = set()

    def on_sigint() -> None:
        if not stop.is_set() and _interrupted_an_answer(running):
            return  # Ctrl-C stopped an answer in the terminal chat; the bot goes on
        stop.set()

    for sig, handler in ((signal.SIGINT, on_sigint), (signal.SIGTERM, stop.set)):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread / no signals here
            loop.add_signal_handler(sig, handler)

    def request_stop(name: str) -> None:
        ended.add(name)
        others = [f.name for f in running if f.name not in ended]
        if others:
            log.info("%s ended; still serving %s", name, ", ".join(others))
        else:
            stop.set()

    interactive = sys.stdin.isatty() if terminal is None else terminal
    context = FrontEndContext(interactive=interactive, request_stop=request_stop, data_dir=Path(settings.data_dir))
    status = 0
    try:
        for plugin, table in _enabled_front_ends(settings, context, only):
            front_end = plugin.create(service, table, context)
            try:
                await front_end.start()
            except (FrontEndSetupError, OSError) as exc:
                log.error("%s: %s (see %s)", plugin.name, exc, plugin.docs)
                with contextlib.suppress(Exception):
                    await front_end.stop()
                status = 1
                return status
            running.append(front_end)
            problem = getattr(front_end, "problem", None)
            if callable(problem):  # readiness (/readyz) includes each front end it started, by name
                service.watch_front_end(front_end.name, problem)
        if not running:
            log.error("no front end enabled: set enabled = true in one of [%s], or run in a terminal",
                      "], [".join(plugin_names(FRONTENDS)))  # fmt: skip
            return 1
        await stop.wait()
    finally:
        for front_end in reversed(running):
            try:
                await front_end.stop()
            except Exception:
                log.exception("stopping %s failed", front_end.name)
        housekeeping.cancel()
        await asyncio.gather(housekeeping, return_exceptions=True)
        await service.close()
        await backend.close()
        await db.dispose()
        log.info("stopped")
    return status
