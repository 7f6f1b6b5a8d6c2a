"""Async database access (SQLAlchemy 2): SQLite via aiosqlite by default, PostgreSQL via asyncpg by URL.

:class:`Database` is the only way the bot touches SQL: one store per aggregate, each in its own module —
:mod:`storage.conversations` (conversations, turns, pictures, followed threads), :mod:`storage.ledger` (usage
and quota overrides), :mod:`storage.access` (allow/deny rules), :mod:`storage.events` (processed events),
:mod:`storage.workers` (heartbeats), :mod:`storage.api_keys` — over the engine, sessions and clock of
:class:`storage.base.Store`.  Each method is one short transaction, so a crash loses at most the answer being
streamed — which is then marked ``interrupted`` at the next start (:meth:`Database.mark_interrupted`), never
deleted.

Why the stores are mixed into one class rather than hung off it as ``db.ledger``, ``db.events`` …: every
caller (the core, the admin commands, the tests) keeps calling ``db.<method>`` unchanged, while each store is
still a class of its own that works alone (``LedgerStore(url)``) and can be read and tested alone; and since
they share one engine and one session factory, a write that spans two aggregates (an answer's final write
settles its usage reservation, a stored answer is linked to its event) stays one transaction.  Method names
are unique across the stores (``tests/storage/test_stores.py`` checks it), so the mix hides nothing.
"""

from __future__ import annotations

from storage.access import AccessStore
from storage.api_keys import ApiKeyStore
from storage.conversations import ConversationStore
from storage.events import EventStore
from storage.ledger import LedgerStore
from storage.workers import WorkerStore

__all__ = ["STORES", "Database"]


class Database(ConversationStore, LedgerStore, EventStore, AccessStore, WorkerStore, ApiKeyStore):
    """All queries the bot, the admin CLI and the tests need: every store over one engine."""


STORES = (ConversationStore, LedgerStore, EventStore, AccessStore, WorkerStore, ApiKeyStore)
"""The stores :class:`Database` is made of, one per aggregate."""
