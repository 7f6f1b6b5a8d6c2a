"""SQL storage beside the bot core: conversations, turns, images, usage, quotas, access rules, events."""

from storage.base import Clock, as_utc, is_unavailable
from storage.conversations import ThreadKey
from storage.db import Database
from storage.ledger import Admission, UsageTotals
from storage.tables import ID_LENGTHS
from storage.url import sqlite_url

__all__ = [
    "ID_LENGTHS",
    "Admission",
    "Clock",
    "Database",
    "ThreadKey",
    "UsageTotals",
    "as_utc",
    "is_unavailable",
    "sqlite_url",
]
