"""Allow/deny lists for users, channels and workspaces (stored in SQL, managed with ``admin allow|deny``).

A deny entry always wins.  For each target kind, as soon as one allow entry exists, only
allowed values pass (an allow-list); with none, everyone passes.
"""

from __future__ import annotations

import time

from bot.core.errors import AccessDenied
from storage import Database

__all__ = ["AccessControl"]


class AccessControl:
    """Caches the rules for a few seconds so every message does not hit the database."""

    def __init__(self, db: Database, ttl_s: float = 5.0) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, dict[tuple[str, str], set[str]]]] = {}

    async def _rules(self, platform: str) -> dict[tuple[str, str], set[str]]:
        cached = self._cache.get(platform)
        if cached and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        table: dict[tuple[str, str], set[str]] = {}
        for rule in await self.db.rules(platform):
            table.setdefault((rule.action, rule.target), set()).add(rule.value)
        self._cache[platform] = (time.monotonic(), table)
        return table

    def invalidate(self) -> None:
        self._cache.clear()

    async def check(self, platform: str, workspace: str, channel: str, user: str) -> None:
        """Raise :class:`AccessDenied` if any rule blocks this user/channel/workspace."""
        rules = await self._rules(platform)
        for target, value in (("workspace", workspace), ("channel", channel), ("user", user)):
            if value in rules.get(("deny", target), set()):
                raise AccessDenied(f"{target} {value} is denied on {platform}")
            allowed = rules.get(("allow", target))
            if allowed and value not in allowed:
                raise AccessDenied(f"{target} {value} is not on the {platform} allow-list")
