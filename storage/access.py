"""Access rules: the allow/deny entries ``minigpt4-bot admin access`` keeps and :mod:`bot.core.access` applies."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from storage.base import Store, affected
from storage.tables import AccessRule

__all__ = ["AccessStore"]


class AccessStore(Store):
    """Allow/deny rules per user, channel, workspace or role."""

    async def add_rule(self, action: str, target: str, platform: str, value: str, note: str | None = None) -> bool:
        if action not in ("allow", "deny") or target not in ("user", "channel", "workspace", "role"):
            raise ValueError("action must be allow|deny and target user|channel|workspace|role")
        try:
            async with self.sessions.begin() as session:
                session.add(
                    AccessRule(
                        action=action, target=target, platform=platform, value=value, note=note, created_at=self.now()
                    )
                )
        except IntegrityError:
            return False
        return True

    async def remove_rule(self, action: str, target: str, platform: str, value: str) -> bool:
        async with self.sessions.begin() as session:
            result = await session.execute(
                delete(AccessRule).where(
                    AccessRule.action == action,
                    AccessRule.target == target,
                    AccessRule.platform == platform,
                    AccessRule.value == value,
                )
            )
            return bool(affected(result))

    async def rules(self, platform: str | None = None) -> list[AccessRule]:
        async with self.sessions() as session:
            query = select(AccessRule).order_by(AccessRule.action, AccessRule.target, AccessRule.value)
            if platform:
                query = query.where(AccessRule.platform == platform)
            return list(await session.scalars(query))
