"""What every command shares: the ``--config`` option, loading settings with logging, the two consoles.

Text that comes from outside the program (configuration errors, paths, exception messages, user
input) is never printed as rich markup: rich would read ``[model]`` as a style and drop it, and
``[/INST]`` would raise.  Print it as ``rich.text.Text``, with ``markup=False``, or escaped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from bot.core.config import ConfigError, Settings, load_settings

__all__ = ["ConfigOption", "err", "log", "out", "setup"]

out = Console()
err = Console(stderr=True)
log = logging.getLogger("minigpt4_bot")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="bot.toml to use (default: $MINIGPT4_BOT_CONFIG or ./bot.toml)")
]


def setup(config: Path | None) -> Settings:
    """Load bot.toml (exit 2 with the reasons when it is invalid) and configure logging from it."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        err.print(Text(str(exc), style="red"))  # literally: messages quote tables such as [model]
        raise typer.Exit(2) from None
    logging.basicConfig(
        level=settings.log_level,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
        force=True,
    )
    return settings
