"""SQL storage beside the bot core: conversations, turns, images, usage, quotas, access rules, events."""

from storage.db import ConversationKey, Database, UsageTotals, as_utc, sqlite_url

__all__ = ["ConversationKey", "Database", "UsageTotals", "as_utc", "sqlite_url"]
