"""Access rules with the ``role`` target (``bot.core.access``), on SQLite and on a real PostgreSQL.

Rules are written with ``Database.add_rule`` (what ``admin allow|deny`` does) and checked through
``AccessControl`` directly and through the core (``Request.roles``).
"""

from __future__ import annotations

import re

import pytest

from bot.core.access import AccessControl
from bot.core.config import Settings
from bot.core.errors import AccessDenied
from bot.core.requests import Final, ImageAttachment, Request
from bot.core.service import BotService
from storage import Database
from tests.pictures import png
from tests.scripted_backend import ScriptedBackend

GUILD, CHANNEL = "G1", "C1"
ML_TEAM, MUTED, OTHER = "111", "222", "333"


async def allowed(access: AccessControl, user: str = "alice", *roles: str, **where: str) -> bool:
    try:
        await access.check("discord", where.get("workspace", GUILD), where.get("channel", CHANNEL), user, roles=roles)
    except AccessDenied as exc:
        assert "discord" in str(exc) and exc.user_message not in str(exc)  # the detail, for the logs
        assert "not enabled for you here" in exc.user_message  # the one text users see
        return False
    return True


def test_role_allow_list_needs_one_allowed_role(run_db):
    async def fn(db: Database):
        access = AccessControl(db)
        assert await allowed(access, "alice", OTHER) and await allowed(access, "bob")  # no rules: everyone
        await db.add_rule("allow", "role", "discord", ML_TEAM)
        access.invalidate()
        assert await allowed(access, "alice", ML_TEAM)
        assert await allowed(access, "alice", OTHER, ML_TEAM)  # one allowed role is enough
        assert not await allowed(access, "bob", OTHER)
        assert not await allowed(access, "bob")  # no role at all
        await db.add_rule("allow", "role", "discord", OTHER)
        access.invalidate()
        assert await allowed(access, "bob", OTHER)  # any of the listed roles
        # Rules are per platform: Slack (no roles) is not limited by Discord's role allow-list.
        await AccessControl(db).check("slack", "T1", "C1", "U1")

    run_db(fn)


def test_denied_role_wins_over_allowed_role_and_user(run_db):
    async def fn(db: Database):
        access = AccessControl(db)
        await db.add_rule("deny", "role", "discord", MUTED)
        assert await allowed(access, "alice", ML_TEAM) and await allowed(access, "bob")  # only a deny: others pass
        assert not await allowed(access, "carol", MUTED)
        await db.add_rule("allow", "role", "discord", ML_TEAM)
        await db.add_rule("allow", "user", "discord", "carol")
        access.invalidate()
        assert not await allowed(access, "carol", ML_TEAM, MUTED)  # any denied role wins over allowed ones
        assert await allowed(access, "carol", ML_TEAM)
        assert not await allowed(access, "alice", ML_TEAM)  # the user allow-list applies too (see below)

    run_db(fn)


def test_allow_lists_of_different_kinds_must_all_be_satisfied(run_db):
    async def fn(db: Database):
        access = AccessControl(db)
        await db.add_rule("allow", "role", "discord", ML_TEAM)
        await db.add_rule("allow", "channel", "discord", CHANNEL)
        assert await allowed(access, "alice", ML_TEAM)
        assert not await allowed(access, "alice", ML_TEAM, channel="C2")  # the role, but not the channel
        assert not await allowed(access, "alice", OTHER)  # the channel, but not the role
        await db.add_rule("deny", "user", "discord", "alice")
        access.invalidate()
        assert not await allowed(access, "alice", ML_TEAM)

    run_db(fn)


def test_dms_have_no_roles(run_db):
    async def fn(db: Database):
        access = AccessControl(db)
        await db.add_rule("deny", "role", "discord", MUTED)
        assert await allowed(access, "alice", workspace="dm", channel="D1")  # only role denies: DMs pass
        await db.add_rule("allow", "role", "discord", ML_TEAM)
        access.invalidate()
        assert not await allowed(access, "alice", workspace="dm", channel="D1")  # a role allow-list: refused

    run_db(fn)


def test_add_rule_accepts_role_and_refuses_unknown_targets(run_db):
    async def fn(db: Database):
        assert await db.add_rule("allow", "role", "discord", ML_TEAM, "ML team")
        assert not await db.add_rule("allow", "role", "discord", ML_TEAM)  # already there
        with pytest.raises(ValueError, match=re.escape("user|channel|workspace|role")):
            await db.add_rule("allow", "group", "discord", ML_TEAM)
        (rule,) = await db.rules("discord")
        assert (rule.action, rule.target, rule.value, rule.note) == ("allow", "role", ML_TEAM, "ML team")
        assert await db.remove_rule("allow", "role", "discord", ML_TEAM) and await db.rules() == []

    run_db(fn)


def _png() -> bytes:
    return png((200, 10, 10), (40, 30))


def test_the_core_checks_the_request_roles(run_db):
    async def fn(db: Database):
        backend = ScriptedBackend()
        service = BotService(Settings.model_validate({}), db, backend)
        try:
            await db.add_rule("allow", "role", "discord", ML_TEAM)
            await db.add_rule("deny", "role", "discord", MUTED)

            async def ask(user: str, roles: tuple[str, ...], workspace: str = GUILD) -> Final:
                request = Request("discord", workspace, CHANNEL, f"t-{user}", user, "What is this?",
                                  (ImageAttachment(_png()),), roles=roles)  # fmt: skip
                return [e async for e in service.handle(request) if isinstance(e, Final)][-1]

            assert (await ask("alice", (ML_TEAM,))).kind == "answer"
            for user, roles, workspace in [("bob", (OTHER,), GUILD), ("carol", (ML_TEAM, MUTED), GUILD),
                                           ("dave", (), "dm")]:  # fmt: skip
                refused = await ask(user, roles, workspace)
                assert refused.kind == "error" and "not enabled for you here" in refused.text, user
            assert len(backend.calls) == 1  # only Alice's question reached the model
        finally:
            await service.close()

    run_db(fn)
