"""Storage is one store per aggregate (issue 22 item 3): small modules, unique method names, each store usable
alone, and threads named by the core's own ``ThreadRef`` (no storage-side copy of it)."""

from __future__ import annotations

import asyncio
import inspect
from collections import namedtuple
from pathlib import Path

import bot.core.service
import storage
from bot.core.requests import ThreadRef
from storage import Database
from storage.access import AccessStore
from storage.base import Store
from storage.conversations import ConversationStore
from storage.db import STORES
from storage.ledger import LedgerStore, UsageTotals

STORAGE = Path(storage.__file__).parent


def test_no_storage_module_is_over_500_lines():
    lengths = {path.name: len(path.read_text().splitlines()) for path in STORAGE.glob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 500} == {}


def test_database_is_exactly_the_stores_and_no_method_is_defined_twice():
    assert Database.__bases__ == STORES
    owners: dict[str, list[str]] = {}
    for store in STORES:
        assert store.__bases__ == (Store,), store  # each store stands on the shared engine only
        for name, value in vars(store).items():
            if inspect.isfunction(value) and not name.startswith("__"):
                owners.setdefault(name, []).append(store.__name__)
    assert {name: found for name, found in owners.items() if len(found) > 1} == {}
    assert not [name for name, value in vars(Database).items() if inspect.isfunction(value)]  # nothing of its own


def test_a_store_works_alone(db_url):
    async def main() -> tuple[UsageTotals, list[str], bool]:
        ledger, access, conversations = LedgerStore(db_url), AccessStore(db_url), ConversationStore(db_url)
        try:
            await ledger.record_usage(platform="slack", workspace="T1", user_id="U1", requests=1, tokens=7, images=2)
            used = await ledger.usage_since("slack", "T1", None, ledger.now().replace(year=2000))
            await access.add_rule("deny", "user", "slack", "U9")
            rules = [rule.value for rule in await access.rules("slack")]
            conversation = await conversations.get_or_create_conversation(ThreadRef("slack", "T1", "C1", "t1"))
            found = await conversations.live_conversation(ThreadRef("slack", "T1", "C1", "t1"))
            return used, rules, found is not None and found.id == conversation.id
        finally:
            for store in (ledger, access, conversations):
                await store.dispose()

    assert asyncio.run(main()) == (UsageTotals(requests=1, tokens=7, images=2), ["U9"], True)
    assert not hasattr(LedgerStore, "add_rule") and not hasattr(AccessStore, "admission")


def test_threads_are_named_by_the_cores_thread_ref_or_anything_shaped_like_it(run_db):
    Place = namedtuple("Place", "platform workspace channel thread")

    async def work(db: Database) -> tuple[bool, bool, bool]:
        created = await db.get_or_create_conversation(ThreadRef("web", "local", "chat", "t1"))
        same = await db.live_conversation(Place("web", "local", "chat", "t1"))  # a ThreadKey: the four attributes
        await db.follow_thread(Place("web", "local", "chat", "t2"))
        return (
            same is not None and same.id == created.id,
            await db.is_followed(ThreadRef("web", "local", "chat", "t2")),
            (await db.live_conversation(ThreadRef("web", "local", "chat", "t2")) is None),
        )

    assert run_db(work) == (True, True, True)
    assert not hasattr(storage, "ConversationKey")  # one type per idea: the core's ThreadRef
    assert not hasattr(bot.core.service, "_key")  # and no conversion in the service
