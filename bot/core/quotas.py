"""Quotas: the one module that says what is counted, over which windows, and what a request costs.

- **Counters** (:data:`COUNTERS`): requests, tokens, images — what the usage ledger counts per request.
  Storage cannot import the core, so its ledger (:class:`storage.UsageTotals`, the ``usage_ledger`` columns)
  mirrors this list the way the tables mirror every schema; ``tests/storage/test_quota_fields.py`` checks
  that they agree, so a counter added here without a migration fails a test.
- **Windows** (:data:`WINDOWS`): UTC calendar days and months (:func:`window_starts`, :func:`window_resets`).
- **Limits** (:data:`LIMITS`): the fields of :class:`~bot.core.config.QuotaLimits` (the ``[quotas]`` settings),
  each ``<counter>_per_<window>`` — checked when this module is imported; the ``quota_settings`` columns
  mirror them (tested likewise).
- **The charging rule**: a request reserves :func:`reservation` when it is admitted (one request and its
  pictures), in the same transaction as the check (:meth:`QuotaPolicy.admit`); the answer's final write
  settles it (:func:`settlement`): the tokens of a done answer, those streamed of an interrupted one, nothing
  for a failed one.  :meth:`QuotaPolicy.release` gives back a reservation whose request was never stored.

The admission, the ``settings`` reply and ``minigpt4-bot admin quota show`` all read
:meth:`QuotaPolicy.overview`'s figures, so what is shown is what is enforced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from bot.core.config import QuotaLimits, QuotaSettings
from bot.core.errors import QuotaExceeded
from storage import Database, UsageTotals

__all__ = [
    "COUNTERS",
    "COUNTER_NAMES",
    "LIMITS",
    "WINDOWS",
    "Counter",
    "QuotaLine",
    "QuotaOverview",
    "QuotaPolicy",
    "ScopeQuota",
    "UsageReader",
    "day_start",
    "limit_parts",
    "month_start",
    "reservation",
    "settlement",
    "window_resets",
    "window_starts",
]


@dataclass(frozen=True)
class Counter:
    """One thing the ledger counts per request, and when the request is charged for it."""

    name: str
    settled: bool = False
    """Known only once the answer is written (tokens): reserved as 0 and charged at settlement, so a limit on
    it stops requests once it has been reached (answers already running finish, and may pass it).  Otherwise
    charged at admission, and a request that would go over the limit is refused."""


COUNTERS: tuple[Counter, ...] = (Counter("requests"), Counter("tokens", settled=True), Counter("images"))
"""What is counted, in the ledger's column order: the one list."""

COUNTER_NAMES: tuple[str, ...] = tuple(c.name for c in COUNTERS)
"""The counters' names, in order: the usage report's columns."""

WINDOWS = ("day", "month")
"""The windows a limit counts over: UTC calendar days and months."""


def day_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    return day_start(now).replace(day=1)


def _next_month(start: datetime) -> datetime:
    return (start + timedelta(days=32)).replace(day=1)


def window_starts(now: datetime) -> dict[str, datetime]:
    """When the current day and month began (UTC): ``{"day": …, "month": …}``."""
    return {"day": day_start(now), "month": month_start(now)}


def window_resets(now: datetime) -> dict[str, datetime]:
    """When the current day and month end (UTC): when a refused request may try again."""
    starts = window_starts(now)
    return {"day": starts["day"] + timedelta(days=1), "month": _next_month(starts["month"])}


def limit_parts(name: str) -> tuple[str, str]:
    """``"tokens_per_day"`` → ``("tokens", "day")``: the usage counter a limit caps, and its window."""
    counter, sep, window = name.partition("_per_")
    if not sep or window not in WINDOWS or counter not in COUNTER_NAMES:
        raise ValueError(f"a quota limit is <{'|'.join(COUNTER_NAMES)}>_per_<day|month>, not {name!r}")
    return counter, window


LIMITS: dict[str, tuple[str, str]] = {name: limit_parts(name) for name in QuotaLimits.model_fields}
"""Each limit (a :class:`~bot.core.config.QuotaLimits` field) with the counter and window it caps, in order."""


def reservation(pictures: int) -> UsageTotals:
    """What a request reserves when it is admitted: one request and its pictures (its tokens are not known)."""
    return UsageTotals(requests=1, images=pictures)


def settlement(usage_id: int, outcome: str, *, streamed: int, completion: int = 0) -> dict[str, Any]:
    """The ledger half of an answer's final write (:meth:`storage.Database.finish_turn`'s keywords), for an
    answer whose ``outcome`` is ``done``, ``interrupted`` or ``failed``.

    A done answer is charged the tokens the backend counted (``completion``); an interrupted one the tokens
    streamed until then (the work was done); a failed one is released — the bot could not answer, so the
    user is not charged.
    """
    tokens = completion if outcome == "done" else streamed
    return {"usage_id": usage_id, "tokens": tokens, "release": outcome == "failed"}


def _crosses(counter: str, used: int, limit: int, charge: UsageTotals) -> bool:
    """Whether a request charged ``charge`` would go over ``limit`` of ``counter`` (see :class:`Counter`)."""
    if next(c for c in COUNTERS if c.name == counter).settled:
        return used >= limit
    return used + getattr(charge, counter) > limit


class UsageReader(Protocol):
    """Where limits and usage are read from: the :class:`~storage.Database`, or an admission transaction."""

    async def quota_setting(self, scope: str, platform: str, workspace: str, user_id: str = "") -> Any: ...

    async def usage_windows(
        self, platform: str, workspace: str, user_id: str | None, starts: Mapping[str, datetime]
    ) -> dict[str, UsageTotals]: ...


@dataclass(frozen=True)
class QuotaLine:
    """One limit of one scope: configured default, stored override (``None``: none), effective, used so far."""

    name: str
    default: int
    override: int | None
    effective: int
    used: int

    @property
    def counter(self) -> str:
        return LIMITS[self.name][0]

    @property
    def window(self) -> str:
        return LIMITS[self.name][1]


@dataclass(frozen=True)
class ScopeQuota:
    scope: str  # user | workspace
    who: str  # the user id; "" for the workspace
    overridden: bool  # an override is stored for this scope
    lines: tuple[QuotaLine, ...]  # in QuotaLimits field order


@dataclass(frozen=True)
class QuotaOverview:
    platform: str
    workspace: str
    day: datetime  # start of the usage windows (UTC)
    month: datetime
    scopes: tuple[ScopeQuota, ...]  # the user's first (when one was asked for), then the workspace's


@dataclass
class QuotaPolicy:
    """Checks a request against the effective limits (admin overrides, else configured defaults)."""

    settings: QuotaSettings
    db: Database

    def defaults(self, scope: str) -> QuotaLimits:
        """The configured limits for a scope (``user`` or ``workspace``)."""
        return self.settings.user if scope == "user" else self.settings.workspace

    async def effective(
        self, scope: str, platform: str, workspace: str, user: str = "", *, reader: UsageReader | None = None
    ) -> QuotaLimits:
        return self.limits(scope, await (reader or self.db).quota_setting(scope, platform, workspace, user))

    def limits(self, scope: str, row: Any) -> QuotaLimits:
        """The defaults of ``scope`` with a stored override ``row`` applied (``None``: no override)."""
        base = self.defaults(scope)
        if row is None:
            return base
        values = {name: getattr(row, name) for name in LIMITS if getattr(row, name) is not None}
        return base.model_copy(update=values)

    async def usage(
        self, platform: str, workspace: str, user_id: str | None, now: datetime, *, reader: UsageReader | None = None
    ) -> dict[str, UsageTotals]:
        """Usage in the current day and month (``user_id=None``: the whole workspace)."""
        return await (reader or self.db).usage_windows(platform, workspace, user_id, window_starts(now))

    async def overview(self, platform: str, workspace: str, user: str | None = None) -> QuotaOverview:
        """Limits and usage for a workspace, and for one of its users when ``user`` is given."""
        now = self.db.now()
        scopes = [*(["user"] if user is not None else []), "workspace"]
        found = [await self._scope(self.db, scope, platform, workspace, user or "", now) for scope in scopes]
        starts = window_starts(now)
        return QuotaOverview(platform, workspace, starts["day"], starts["month"], tuple(s for s in found if s))

    async def admit(self, platform: str, workspace: str, user: str, new_images: int) -> int:
        """Admit a request or raise :class:`QuotaExceeded` naming the first limit it would cross.

        The check and the request's usage reservation are one transaction, serialized per workspace
        (:meth:`storage.Database.admission`), so simultaneous requests — from one process or several — are
        counted exactly: with a limit of 3, three of six requests sent at once get through.  Returns the
        reservation, which the answer's final write settles (:func:`settlement`) or :meth:`release` gives back.
        """
        async with self.db.admission(platform, workspace, user, reservation(new_images)) as admission:
            await self._check(admission, platform, workspace, user, new_images, self.db.now())
        return admission.usage_id

    async def release(self, usage_id: int) -> None:
        """Give back the reservation of a request that never reached the model (storing its turns failed)."""
        await self.db.release_usage(usage_id)

    async def _check(
        self, reader: UsageReader, platform: str, workspace: str, user: str, new_images: int, now: datetime
    ) -> None:
        charge, resets = reservation(new_images), window_resets(now)
        for scope in ("user", "workspace"):
            quota = await self._scope(reader, scope, platform, workspace, user, now, if_limited=True)
            for line in quota.lines if quota is not None else ():
                if line.effective and _crosses(line.counter, line.used, line.effective, charge):
                    raise QuotaExceeded(scope, line.name, line.used, line.effective, resets[line.window])

    async def _scope(
        self, reader: UsageReader, scope: str, platform: str, workspace: str, user: str, now: datetime,
        *, if_limited: bool = False,
    ) -> ScopeQuota | None:  # fmt: skip
        """One scope's limits with what is used of each (``if_limited``: ``None`` when nothing is limited, and
        no usage is read)."""
        who = user if scope == "user" else ""
        row = await reader.quota_setting(scope, platform, workspace, who)
        limits = self.limits(scope, row)
        if if_limited and not any(getattr(limits, name) for name in LIMITS):
            return None
        usage = await self.usage(platform, workspace, user if scope == "user" else None, now, reader=reader)
        defaults = self.defaults(scope)
        lines = tuple(
            QuotaLine(
                name,
                getattr(defaults, name),
                getattr(row, name) if row is not None else None,
                getattr(limits, name),
                getattr(usage[window], counter),
            )
            for name, (counter, window) in LIMITS.items()
        )
        return ScopeQuota(scope, who, row is not None, lines)
