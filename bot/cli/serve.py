"""The composition root: settings → database → model + engine → bot core → front ends.

``serve`` runs until interrupted (or until the terminal chat ends when it is the only front
end).  The model is imported here, lazily, so the rest of ``bot`` stays free of torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bot.core.config import Settings
from bot.core.service import BotService
from storage import Database

if TYPE_CHECKING:
    from model import MiniGPT4

__all__ = ["load_model", "open_database", "run_bot"]

log = logging.getLogger(__name__)


def load_model(settings: Settings, progress: Callable[[str, int], None] | None = None) -> MiniGPT4:
    """Load the configured weights, writing tiny demo weights first when none are configured."""
    from model import load_minigpt4

    kwargs: dict[str, Any] = settings.model.loader_kwargs()
    if settings.model.uses_demo_weights:
        from model.demo_weights import DEMO_NOTICE, write_demo_weights

        log.warning("No weights configured — %s.", DEMO_NOTICE)
        kwargs |= write_demo_weights(settings.demo_weights_dir, settings.model.variant).loader_kwargs()
    return load_minigpt4(**kwargs, progress=progress)


async def open_database(settings: Settings) -> Database:
    """Open the configured database and bring its schema up to date (Alembic)."""
    from pathlib import Path

    from storage.migrate import upgrade_async

    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    url = settings.database_url()
    await upgrade_async(url)
    return Database(url)


def engine_config(settings: Settings) -> Any:
    from model.engine import EngineConfig, SchedulerConfig

    e = settings.engine
    scheduler = SchedulerConfig(
        max_batch=e.max_batch,
        max_prefills_per_step=e.max_prefills_per_step,
        max_queue=e.max_queue,
        max_queued_per_user=e.max_queued_per_user,
        max_running_per_user=e.max_running_per_user,
        max_wait_s=e.max_wait_s,
        kv_budget_tokens=e.kv_budget_tokens,
    )
    return EngineConfig(scheduler=scheduler, image_cache_size=e.image_cache_size, prefix_reuse=e.prefix_reuse)


async def _prune_daily(service: BotService) -> None:
    """Keep the redelivery table small: prune at start, then once a day."""
    while True:
        try:
            await service.prune_events()
        except Exception:  # a database blip must not end the bot; try again tomorrow
            log.exception("pruning processed events failed")
        await asyncio.sleep(24 * 3600)


async def run_bot(settings: Settings, *, terminal: bool | None = None, model: MiniGPT4 | None = None) -> None:
    """Start everything configured and run until a signal (or the terminal chat) ends it."""
    from model.engine import Engine
    from model.engine.backend import EngineBackend

    db = await open_database(settings)
    if model is None:
        model = await asyncio.to_thread(load_model, settings)
    engine = Engine(model, engine_config(settings)).start()
    backend = EngineBackend(
        engine, info={"demo": settings.model.uses_demo_weights}, timeout_s=settings.engine.request_timeout_s
    )
    service = BotService(settings, db, backend)
    await service.recover()
    housekeeping = asyncio.create_task(_prune_daily(service))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread / no signals here
            loop.add_signal_handler(sig, stop.set)
    runners: list[Any] = []
    tasks: list[asyncio.Task[Any]] = [housekeeping]
    try:
        if settings.web.enabled:
            from adapters.web import run_web

            runners.append(await run_web(service, settings.web.host, settings.web.port))
        if settings.slack.enabled:
            from adapters.slack import SlackSetupError, start_slack  # slack_bolt only when Slack is on

            try:
                runners.append(await start_slack(service, settings))
            except SlackSetupError as exc:
                log.error("Slack: %s (see docs/slack.md)", exc)
                return
        use_terminal = sys.stdin.isatty() if terminal is None else terminal
        if use_terminal:
            from adapters.terminal import TerminalChat

            chat = asyncio.create_task(TerminalChat(service.handle).run())
            chat.add_done_callback(lambda _t: stop.set() if not runners else None)  # the only front end
            tasks.append(chat)
        if not runners and tasks == [housekeeping]:
            log.error("no front end enabled: set [web] or [slack] enabled = true, or run in a terminal")
            return
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for runner in runners:
            await runner.cleanup()
        await asyncio.to_thread(engine.stop)
        await db.dispose()
        log.info("stopped")
