"""The Slack front end, registered as ``slack`` in the ``minigpt4_bot.frontends`` entry-point group.

Modules by job, bolt-style: :mod:`~adapters.slack.app` (the bolt app, listeners and lifecycle),
:mod:`~adapters.slack.files` (picture downloads and the Slack host allow-list),
:mod:`~adapters.slack.http` (the HTTP Events API endpoint: signatures and bodies checked before bolt),
:mod:`~adapters.slack.messages` (mrkdwn, mentions, Slack's editable messages) and
:mod:`~adapters.slack.settings` (``[slack]`` in ``bot.toml``).  Importing this package loads only the
settings: slack_bolt and slack_sdk are imported when the front end is created.  Set-up: ``docs/slack.md``.
"""

from __future__ import annotations

from adapters.slack.settings import SlackSettings
from bot.core.frontend_api import Core, FrontEnd, FrontEndContext, FrontEndPlugin, FrontEndSetupError

__all__ = ["FRONT_END", "SlackSettings", "create"]


def create(core: Core, settings: SlackSettings, context: FrontEndContext) -> FrontEnd:
    """The Slack front end on ``core`` (not started: ``start`` reads the tokens and connects)."""
    from adapters.slack.app import SlackFrontEnd

    return SlackFrontEnd(core, settings)


def check(settings: SlackSettings) -> str | None:
    """The tokens ``mode`` needs in the environment, looked at before ``serve`` loads the model."""
    from adapters.slack.app import SlackTokens

    try:
        SlackTokens.from_env(settings.mode)
    except FrontEndSetupError as exc:
        return str(exc)
    return None


FRONT_END = FrontEndPlugin(name="slack", settings=SlackSettings, create=create, check=check, docs="docs/slack.md")
