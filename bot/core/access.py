"""Allow/deny lists for users, channels, workspaces and roles (stored in SQL, managed with ``admin allow|deny``).

Each rule names a platform, a target kind and a value (an id on that platform).  The kinds:

* ``workspace``, ``channel``, ``user`` — the request's own ids;
* ``role`` — the ids of the roles or groups the author has on the platform (``Request.roles``: Discord role ids;
  no role on platforms without roles, such as Slack, the web chat or the terminal).

How the rules combine, for one platform:

1. **A deny rule always wins**: a request is refused if its workspace, channel or user is denied, or if *any* of
   the author's roles is denied — whatever the allow rules say.
2. **Each kind with allow rules is an allow-list that must be satisfied**; kinds without allow rules let everyone
   through.  The workspace, the channel and the user must each be listed in their kind's allow-list (when that
   kind has one), and for roles at least one of the author's roles must be listed.  Allow-lists of different
   kinds combine with *and*: with ``allow role R`` and ``allow channel C``, only members with role R, in channel
   C, pass.

Discord DMs have no server and so no roles: with a role allow-list DMs are refused (no role can match); with only
role denies they pass (no role is denied).  Users in DMs can still be allowed or denied by ``user`` rules (and the
``dm`` workspace by a ``workspace`` rule).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from bot.core.errors import AccessDenied
from bot.core.requests import normalize_id, normalize_user
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
            # spelled as requests are (bot.core.requests): a rule for "Q1" on the web also matches "q1"
            value = normalize_user(platform, rule.value) if rule.target == "user" else normalize_id(rule.value)
            table.setdefault((rule.action, rule.target), set()).add(value)
        self._cache[platform] = (time.monotonic(), table)
        return table

    def invalidate(self) -> None:
        self._cache.clear()

    async def check(self, platform: str, workspace: str, channel: str, user: str, *, roles: Iterable[str] = ()) -> None:
        """Raise :class:`AccessDenied` if any rule blocks this request (see the module docstring for the rules).

        ``roles``: the ids of the author's roles on the platform (empty where it has none, or in a DM).  The
        exception's detail is for the logs; the user sees :class:`AccessDenied`'s own text.
        """
        rules = await self._rules(platform)
        held = set(roles)
        ids = (("workspace", workspace), ("channel", channel), ("user", user))
        for target, value in ids:
            if value in rules.get(("deny", target), set()):
                raise AccessDenied(f"{target} {value} is denied on {platform}")
        denied_roles = held & rules.get(("deny", "role"), set())
        if denied_roles:
            raise AccessDenied(f"role {min(denied_roles)} of user {user} is denied on {platform}")
        for target, value in ids:
            allowed = rules.get(("allow", target))
            if allowed and value not in allowed:
                raise AccessDenied(f"{target} {value} is not on the {platform} allow-list")
        allowed_roles = rules.get(("allow", "role"))
        if allowed_roles and not held & allowed_roles:
            raise AccessDenied(f"user {user} has none of the roles on the {platform} allow-list ({len(held)} held)")
