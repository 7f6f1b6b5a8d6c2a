"""Quotas: per-user and per-workspace limits checked before work is queued, counted from the usage ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bot.core.config import QuotaLimits, QuotaSettings
from bot.core.errors import QuotaExceeded
from storage import Database

__all__ = ["QuotaPolicy", "day_start", "month_start"]

LIMITS = ("requests_per_day", "requests_per_month", "tokens_per_day", "tokens_per_month", "images_per_day")


def day_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    return day_start(now).replace(day=1)


def _next_month(start: datetime) -> datetime:
    return (start + timedelta(days=32)).replace(day=1)


@dataclass
class QuotaPolicy:
    """Checks a request against the effective limits (admin overrides, else configured defaults)."""

    settings: QuotaSettings
    db: Database

    async def effective(self, scope: str, platform: str, workspace: str, user: str = "") -> QuotaLimits:
        base = self.settings.user if scope == "user" else self.settings.workspace
        row = await self.db.quota_setting(scope, platform, workspace, user)
        if row is None:
            return base
        values = {name: getattr(row, name) for name in LIMITS if getattr(row, name) is not None}
        return base.model_copy(update=values)

    async def check(self, platform: str, workspace: str, user: str, new_images: int, now: datetime) -> None:
        """Raise :class:`QuotaExceeded` naming the first limit this request would cross."""
        today, month = day_start(now), month_start(now)
        for scope, who in (("user", user), ("workspace", "")):
            limits = await self.effective(scope, platform, workspace, who)
            if not any(getattr(limits, name) for name in LIMITS):
                continue
            user_id = user if scope == "user" else None
            day = await self.db.usage_since(platform, workspace, user_id, today)
            mon = await self.db.usage_since(platform, workspace, user_id, month)
            checks = [
                ("requests_per_day", day.requests + 1, today + timedelta(days=1)),
                ("requests_per_month", mon.requests + 1, _next_month(month)),
                ("tokens_per_day", day.tokens + 1 if day.tokens else 0, today + timedelta(days=1)),
                ("tokens_per_month", mon.tokens + 1 if mon.tokens else 0, _next_month(month)),
                ("images_per_day", day.images + new_images, today + timedelta(days=1)),
            ]
            for name, would_use, resets in checks:
                limit = getattr(limits, name)
                if limit and would_use > limit:
                    used = would_use - (new_images if name == "images_per_day" else 1)
                    raise QuotaExceeded(scope, name, max(used, 0), limit, resets)
