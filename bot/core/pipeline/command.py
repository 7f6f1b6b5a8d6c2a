"""The command step: what the message asks for (:mod:`bot.core.commands`) — ``help``, ``reset`` and
``settings`` are answered here; a question goes on down the chain with its :class:`ParsedMessage`."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from bot.core.commands import Command, parse_request
from bot.core.errors import ImageError, UserInputError
from bot.core.grounding import task_help
from bot.core.pipeline.chain import Context, Handler, Parts
from bot.core.requests import Final, ReplyEvent, Request
from bot.core.sanitize import clean_text

__all__ = ["RESET_TEXT", "Commands", "help_text", "settings_text"]

RESET_TEXT = "Starting over: the next picture and question begin a new conversation."
NO_THREAD = (Command.SETTINGS, Command.HELP)
"""Typed commands that read no thread: they follow none (a slash command may come from no thread at all)."""


def help_text(presets: list[str]) -> str:
    """The one help text, plain (no markup): every front end shows it as is or escaped."""
    names = ", ".join(presets)
    eg = "story" if "story" in presets or not presets else presets[0]  # an example the bot really has
    return (
        "MiniGPT-4 answers questions about pictures.\n"
        "• Send a picture with a question — or just a picture for a description.\n"
        "• Reply in the thread to follow up; new pictures join the conversation.\n"
        f"• Presets ask with a prepared prompt: {names}. Send the name alone ({eg}), or after a slash with "
        f"words to add (/{eg} about a cat; !{eg} works too). Other messages are asked as written.\n"
        '• "reset" starts this thread over, "settings" shows the model and your limits, "help" shows this.'
    ) + (f"\n{tasks}" if (tasks := task_help(presets)) else "")


async def settings_text(parts: Parts, request: Request) -> str:
    """The ``settings`` reply: the model, the answer settings, the presets and the asker's limits."""
    model = parts.backend.describe()
    overview = await parts.quotas.overview(request.platform, request.workspace, request.user)
    g = parts.settings.generation
    lines = [
        f"Model: MiniGPT-4 {model.get('variant', '?')} on {model.get('device', '?')} "
        f"({model.get('dtype', '?')}{', demo weights' if model.get('demo') else ''})",
        f"Answers: up to {g.max_new_tokens} tokens, temperature {g.temperature}, top-p {g.top_p}, "
        f"{'sampling' if g.do_sample else 'greedy'}",
        f"Presets: {', '.join(parts.presets.names)} (default for a bare picture: {parts.settings.presets.default})",
    ]
    limited = False
    for scope in overview.scopes:  # the user's, then the workspace's: each limit with what is used of it
        caps = [f"{q.name.replace('_', ' ')} {q.effective} ({q.used} used)" for q in scope.lines if q.effective]
        limited = limited or bool(caps)
        if scope.scope == "user":
            lines.append("Your limits: " + (", ".join(caps) if caps else "none"))
        elif caps:
            lines.append("This workspace's limits (everyone together): " + ", ".join(caps))
    if limited:
        lines.append("Days and months are UTC: daily counts start over at 00:00 UTC.")
    return "\n".join(lines)


class Commands:
    """An addressed message follows its thread (later pictures there need no mention; not a typed
    ``settings``/``help``, which have none); a picture the front end could not fetch is refused; then the
    message is parsed (its typed :attr:`~bot.core.requests.Request.command`, or the text) and a command
    answered: ``help`` and ``settings`` to the asker alone, ``reset`` archives the live conversation."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        request, db = ctx.request, self.parts.db
        if request.addressed and request.command not in NO_THREAD:
            await db.follow_thread(ctx.key)
        if failed := next((img.error for img in request.images if img.error), None):
            raise ImageError(failed)
        try:
            ctx.parsed = parse_request(request.command, request.text, self.parts.presets.names, request.preset)
        except KeyError as exc:
            raise UserInputError(f"{exc.args[0]}. Say help for the list.") from None
        if ctx.parsed.command == Command.HELP:
            yield Final(clean_text(help_text(self.parts.presets.names)), kind="help", ephemeral=True)
        elif ctx.parsed.command == Command.RESET:
            if (live := await db.live_conversation(ctx.key)) is not None:
                await db.archive_conversation(live.id)
            await db.follow_thread(ctx.key)  # a picture posted after the reset starts anew, even after a restart
            yield Final(RESET_TEXT, kind="notice")
        elif ctx.parsed.command == Command.SETTINGS:
            yield Final(await settings_text(self.parts, request), kind="notice", ephemeral=True)
        else:
            async with aclosing(call_next(ctx)) as events:
                async for event in events:
                    yield event
