"""Quotas: per-user and per-workspace limits checked before work is queued, counted from the usage ledger.

The limits are the fields of :class:`~bot.core.config.QuotaLimits`, each named
``<counter>_per_<window>``: ``counter`` is a :class:`~storage.UsageTotals` field (requests, tokens,
images) and ``window`` a UTC calendar ``day`` or ``month``.  Nothing here lists them again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from bot.core.config import QuotaLimits, QuotaSettings
from bot.core.errors import QuotaExceeded
from storage import Database, UsageTotals

__all__ = ["WINDOWS", "QuotaPolicy", "UsageReader", "day_start", "limit_parts", "month_start", "window_starts"]

WINDOWS = ("day", "month")


def day_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    return day_start(now).replace(day=1)


def _next_month(start: datetime) -> datetime:
    return (start + timedelta(days=32)).replace(day=1)


def window_starts(now: datetime) -> dict[str, datetime]:
    """When the current day and month began (UTC): ``{"day": …, "month": …}``."""
    return {"day": day_start(now), "month": month_start(now)}


def limit_parts(name: str) -> tuple[str, str]:
    """``"tokens_per_day"`` → ``("tokens", "day")``: the usage counter a limit caps, and its window."""
    counter, sep, window = name.partition("_per_")
    if not sep or window not in WINDOWS or counter not in UsageTotals.__dataclass_fields__:
        raise ValueError(f"a quota limit is <requests|tokens|images>_per_<day|month>, not {name!r}")
    return counter, window


class UsageReader(Protocol):
    """Where limits and usage are read from: the :class:`~storage.Database`, or an admission transaction."""

    async def quota_setting(self, scope: str, platform: str, workspace: str, user_id: str = "") -> Any: ...

    async def usage_windows(
        self, platform: str, workspace: str, user_id: str | None, starts: Mapping[str, datetime]
    ) -> dict[str, UsageTotals]: ...


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
        values = {name: getattr(row, name) for name in QuotaLimits.model_fields if getattr(row, name) is not None}
        return base.model_copy(update=values)

    async def usage(
        self, platform: str, workspace: str, user_id: str | None, now: datetime, *, reader: UsageReader | None = None
    ) -> dict[str, UsageTotals]:
        """Usage in the current day and month (``user_id=None``: the whole workspace)."""
        return await (reader or self.db).usage_windows(platform, workspace, user_id, window_starts(now))

    async def admit(self, platform: str, workspace: str, user: str, new_images: int) -> int:
        """Admit a request or raise :class:`QuotaExceeded` naming the first limit it would cross.

        The check and the request's usage reservation are one transaction, serialized per workspace
        (:meth:`storage.Database.admission`), so simultaneous requests — from one process or several — are
        counted exactly: with a limit of 3, three of six requests sent at once get through.  Returns the
        reservation, which the answer's final write completes with its tokens (or releases on failure).
        """
        async with self.db.admission(platform, workspace, user, images=new_images) as admission:
            await self._check(admission, platform, workspace, user, new_images, self.db.now())
        return admission.usage_id

    async def _check(
        self, reader: UsageReader, platform: str, workspace: str, user: str, new_images: int, now: datetime
    ) -> None:
        starts = window_starts(now)
        resets = {"day": starts["day"] + timedelta(days=1), "month": _next_month(starts["month"])}
        for scope, who in (("user", user), ("workspace", "")):
            limits = await self.effective(scope, platform, workspace, who, reader=reader)
            if not any(getattr(limits, name) for name in QuotaLimits.model_fields):
                continue
            usage = await self.usage(platform, workspace, user if scope == "user" else None, now, reader=reader)
            for name in QuotaLimits.model_fields:
                limit = getattr(limits, name)
                counter, window = limit_parts(name)
                used = getattr(usage[window], counter)
                if limit and _crosses(counter, used, limit, new_images):
                    raise QuotaExceeded(scope, name, used, limit, resets[window])


def _crosses(counter: str, used: int, limit: int, new_images: int) -> bool:
    """Whether this request would go over ``limit``.

    A request counts one, pictures count as they arrive; an answer's tokens are not known in advance,
    so a token limit stops requests once it has been reached (answers already running finish, so a token
    limit can be passed by what those answers write).
    """
    if counter == "tokens":
        return used >= limit
    return used + (new_images if counter == "images" else 1) > limit
