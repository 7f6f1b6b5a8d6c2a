"""A table's ``enabled`` is on/off; only the terminal's also takes ``"auto"`` (its own type, the base stays bool)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from adapters.discord.settings import DiscordSettings
from adapters.slack.settings import SlackSettings
from adapters.terminal import FRONT_END, TerminalSettings
from adapters.web.settings import WebSettings
from bot.core.frontend_api import FrontEndContext, FrontEndSettings


@pytest.mark.parametrize("table", [FrontEndSettings, WebSettings, SlackSettings, DiscordSettings])
def test_other_tables_take_only_on_or_off(table: type[FrontEndSettings]) -> None:
    assert table(enabled=True).enabled is True and table(enabled=False).enabled is False
    for bad in ("auto", "sometimes", 2):
        with pytest.raises(ValidationError):
            table(enabled=bad)


def test_the_terminal_takes_auto_and_starts_when_interactive() -> None:
    assert issubclass(TerminalSettings, FrontEndSettings) and TerminalSettings().enabled == "auto"
    with pytest.raises(ValidationError):
        TerminalSettings(enabled="sometimes")
    for enabled, interactive, starts in [("auto", True, True), ("auto", False, False), (True, False, True),
                                         (False, True, False)]:  # fmt: skip
        context = FrontEndContext(interactive=interactive)
        assert FRONT_END.enabled(TerminalSettings(enabled=enabled), context) is starts, (enabled, interactive)
