"""The platform-neutral core of minigpt4-bot (imports neither torch nor any chat SDK)."""
