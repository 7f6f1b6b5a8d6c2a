"""Liveness, readiness and the metrics text of the core (:meth:`Core.health <bot.core.frontend_api.Core.health>`,
``readiness``, ``metrics_text``): what ``/healthz``, ``/readyz`` and ``/metrics`` endpoints report."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from bot.core.frontend_api import Health
from bot.core.pipeline.chain import Parts, log
from bot.core.sanitize import clean_text

__all__ = ["HealthChecks", "ProblemCheck"]

ProblemCheck = Callable[[], "str | Awaitable[str | None] | None"]
"""A running front end's readiness check (``FrontEnd.problem``): ``None`` when fine, else one line."""


class HealthChecks:
    """The checks, and the last readiness result (to log only the changes).  ``timing`` has
    ``READY_DB_TIMEOUT_S`` and ``READY_CHECK_TIMEOUT_S`` (the :class:`~bot.core.service.BotService`, read at
    each check)."""

    def __init__(self, parts: Parts, timing: Any) -> None:
        self.parts, self.timing = parts, timing
        self.front_ends: dict[str, ProblemCheck] = {}
        self._checks: dict[str, str] = {}

    async def health(self) -> Health:
        """Liveness: the process answers and the model backend describes itself.  No database, no network."""
        backend = self.parts.backend
        try:
            model, stats = backend.describe(), backend.stats()
        except Exception as exc:
            log.warning("health check: the model backend did not answer: %s", exc)
            return Health(ok=False, checks={"engine": "the model backend did not answer"})
        engine = {k: stats.get(k) for k in ("queue_depth", "batch_size")}
        return Health(ok=True, model=model, engine=engine, checks={"engine": "ok"})

    async def readiness(self) -> Health:
        """Readiness: ``database`` (``SELECT 1`` within ``READY_DB_TIMEOUT_S``), ``engine`` and every watched
        front end, checked now.  Sets the ``minigpt4_ready`` and ``minigpt4_check_ok`` gauges; a check that
        changes state is logged once."""
        database, front_ends = await asyncio.gather(
            self._check_database(),
            asyncio.gather(*(self._check_front_end(check) for check in self.front_ends.values())),
        )
        model, engine, engine_state = await self._check_engine()
        checks = {"database": database, "engine": engine_state, **dict(zip(self.front_ends, front_ends, strict=True))}
        for name, state in checks.items():
            if state != self._checks.get(name, "ok"):
                if state == "ok":
                    log.info("readiness: %s is ok again", name)
                else:
                    log.warning("readiness: %s: %s", name, state)
        self._checks = checks
        self.parts.metrics.set_readiness(checks)
        return Health(ok=all(v == "ok" for v in checks.values()), model=model, engine=engine, checks=checks)

    def watch(self, name: str, problem: ProblemCheck) -> None:
        self.front_ends[clean_text(name)] = problem

    async def _check_database(self) -> str:
        timeout = self.timing.READY_DB_TIMEOUT_S
        try:
            await self.parts.db.ping(timeout=timeout)
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except Exception as exc:
            if self._checks.get("database", "ok") == "ok":
                log.warning("readiness: the database ping failed: %r", exc)
            return f"unreachable ({type(exc).__name__})"
        return "ok"

    async def _check_engine(self) -> tuple[dict[str, Any], dict[str, Any], str]:
        """The model facts, the engine gauges, and the state: the backend answers (and its own optional
        ``problem()`` — e.g. a remote backend's connection — says nothing is wrong)."""
        backend = self.parts.backend
        try:
            model, stats = backend.describe(), backend.stats()
            check = getattr(backend, "problem", None)
            problem = await self._check_front_end(check) if callable(check) else "ok"
        except Exception as exc:
            log.debug("readiness: the model backend did not answer: %r", exc)
            return {}, {}, "the model backend did not answer"
        return model, {k: stats.get(k) for k in ("queue_depth", "batch_size")}, problem

    async def _check_front_end(self, problem: ProblemCheck) -> str:
        timeout = self.timing.READY_CHECK_TIMEOUT_S
        try:
            result = problem()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, timeout)
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except Exception as exc:
            log.debug("readiness check failed", exc_info=exc)
            return f"the check failed ({type(exc).__name__})"
        return "ok" if result is None else clean_text(str(result)).strip() or "not ready"
