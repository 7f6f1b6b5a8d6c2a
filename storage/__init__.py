"""SQL storage beside the bot core: conversations, turns, images, usage, quotas, access rules, events."""

from storage.db import Clock, ConversationKey, Database, UsageTotals, as_utc, sqlite_url

__all__ = ["Clock", "ConversationKey", "Database", "UsageTotals", "as_utc", "sqlite_url"]
