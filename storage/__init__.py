"""SQL storage beside the bot core: conversations, turns, images, usage, quotas, access rules, events."""

from storage.db import Admission, Clock, ConversationKey, Database, UsageTotals, as_utc, sqlite_url
from storage.tables import ID_LENGTHS

__all__ = ["ID_LENGTHS", "Admission", "Clock", "ConversationKey", "Database", "UsageTotals", "as_utc", "sqlite_url"]
