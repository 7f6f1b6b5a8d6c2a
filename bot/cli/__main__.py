"""``python -m bot.cli`` = ``minigpt4-bot``."""

from bot.cli.main import main

main()
