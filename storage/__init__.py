"""SQL storage for conversations, usage and quotas (filled in by the bot-core issue)."""
