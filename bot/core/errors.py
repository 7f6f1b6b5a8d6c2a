"""Errors that carry the text a user should see (discord.py's pattern): adapters render ``user_message``.

Details go to the log; users never see exceptions, tracebacks or tokens.
"""

from __future__ import annotations

from datetime import datetime

__all__ = [
    "AccessDenied",
    "BotError",
    "BusyError",
    "ImageError",
    "ModelUnavailable",
    "NoImageError",
    "QuotaExceeded",
    "UnsupportedRequest",
    "UserInputError",
]


class BotError(Exception):
    """Base class: ``user_message`` is safe to post; ``ephemeral`` asks adapters to show it only to the user."""

    ephemeral = True

    def __init__(self, user_message: str, detail: str | None = None) -> None:
        super().__init__(detail or user_message)
        self.user_message = user_message


class UserInputError(BotError):
    """Something about the message itself is wrong."""


class ImageError(UserInputError):
    """A picture is unreadable, of an unsupported kind, or too large."""


class NoImageError(UserInputError):
    """A question in a thread that has no picture yet."""

    def __init__(self) -> None:
        from bot.core.images import accepted_formats  # images raises these errors: imported when needed

        super().__init__(
            f"I need a picture to talk about: attach an image ({accepted_formats()}) with your question, "
            "or ask in a thread that already has one. Say help for what I can do."
        )


class AccessDenied(BotError):
    """The user, channel or workspace is not allowed to use the bot."""

    def __init__(self, detail: str) -> None:
        super().__init__("Sorry, I'm not enabled for you here. Ask your workspace admin if you need access.", detail)


class UnsupportedRequest(BotError):
    """The front end sent something the core cannot store (an id longer than its column): a bug or a limit
    of that integration, not of the user's message — which the text says, so nobody retries in vain."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "Sorry, I can't handle messages from this place: the chat integration sent an identifier I can't "
            "store. This is not about your message; the bot's operator can find the details in its log.",
            detail,
        )


class QuotaExceeded(BotError):
    """A usage limit is reached; the message names the limit and when it resets."""

    def __init__(self, scope: str, limit_name: str, used: int, limit: int, resets_at: datetime) -> None:
        who = "You have" if scope == "user" else "This workspace has"
        what = limit_name.replace("_", " ")
        when = resets_at.strftime("%Y-%m-%d %H:%M UTC")
        super().__init__(f"{who} reached the limit of {limit} {what} ({used} used). It resets at {when}.")
        self.scope, self.limit_name, self.used, self.limit, self.resets_at = scope, limit_name, used, limit, resets_at


class BusyError(BotError):
    """The model is saturated right now (engine backpressure)."""

    ephemeral = False

    def __init__(self, retry_after_s: float) -> None:
        seconds = max(1, round(retry_after_s))
        super().__init__(f"I'm answering a lot of questions right now — please try again in about {seconds} seconds.")
        self.retry_after_s = retry_after_s


class ModelUnavailable(BotError):
    """The model failed or is not loaded."""

    ephemeral = False

    def __init__(self, detail: str) -> None:
        super().__init__("Sorry, something went wrong while answering. Please try again in a moment.", detail)
