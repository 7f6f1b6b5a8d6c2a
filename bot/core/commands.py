"""Commands: what a message asks the bot to do, and the one parser for commands written as text.

A front end whose platform has command objects (Slack's slash command through bolt's ``app.command()``,
Discord's app commands ``/ask /reset /settings /help``, the terminal's ``/reset``) says which command it
received in :attr:`Request.command <bot.core.requests.Request.command>`; the core then never reads the
text for command words:

* ``ask``: the text is the question (a preset named in it, ``/story …`` or ``story``, and the request's
  explicit ``preset`` still apply; ``help``, ``reset`` and ``settings`` are words of the question);
* ``reset``, ``settings``, ``help``: the command itself; the text is not read.

``None`` is a plain message (a mention, a DM, a thread reply, the web chat's text box): :func:`parse_message`
decides — the words ``help``, ``reset``, ``settings`` alone (or after ``/`` or ``!``), a preset, or a question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.core import grounding
from bot.core.requests import Command

__all__ = ["COMMAND_WORDS", "Command", "ParsedMessage", "parse_message", "parse_request"]


COMMAND_WORDS = (Command.HELP, Command.RESET, Command.SETTINGS)
"""The commands a plain message may write as a word (``help``, ``/reset``, ``!settings``)."""


@dataclass(frozen=True)
class ParsedMessage:
    """What a message asks for: a bot command (``help``, ``reset``, ``settings``), or a question (possibly
    through a preset)."""

    command: Command | None = None
    preset: str | None = None
    question: str = ""


_SLASHED = re.compile(r"^([/!])([A-Za-z][\w-]*)(?:\s+(.*))?$", re.DOTALL)
"""``/story about a cat`` (or ``!story …`` where the chat app keeps ``/`` for its own commands)."""
_ALONE = re.compile(r"^([A-Za-z][\w-]*)\s*[.!?:]?$")
"""A message that is one word (``story``, ``Help?``)."""


def parse_request(
    command: Command | str | None, text: str, presets: list[str], explicit_preset: str | None = None
) -> ParsedMessage:
    """What a request asks for: its typed ``command`` as it is (``ask``: the text as a question, command words
    included), or, for a plain message (``None``), what :func:`parse_message` reads in the text.  Raises
    ``KeyError`` as :func:`parse_message` does (and for a command the core does not know)."""
    if command is None:
        return parse_message(text, presets, explicit_preset)
    try:
        typed = Command(command)
    except ValueError:
        raise KeyError(f"unknown command {command!r}") from None
    if typed is Command.ASK:
        return parse_message(text, presets, explicit_preset, commands=())
    return ParsedMessage(command=typed)


def parse_message(
    text: str, presets: list[str], explicit_preset: str | None = None, *, commands: tuple[Command, ...] = COMMAND_WORDS
) -> ParsedMessage:
    """What a message asks for.  A preset or a command is one only as a command: the message is exactly its
    name (``story``, ``help``), or starts with a slash (``/story about a cat``, ``!story …``; the words after
    it are added to the preset's prompt), or the front end picked the preset for this message
    (``explicit_preset``: a menu or a command option of the front end).  Anything else is a plain question, so "Describe
    the roof please" or "Story time: tell me one" are asked as written.  ``commands``: the command words read
    (none for a typed ``ask``, whose text is a question).  Raises ``KeyError`` (a message for the user) for an
    unknown ``/word`` or an unknown explicit preset."""
    text = text.strip()
    if explicit_preset is not None and explicit_preset not in presets:
        raise KeyError(f"unknown preset {explicit_preset!r}")
    if slashed := _SLASHED.match(text):
        mark, word, rest = slashed.group(1), slashed.group(2).lower(), (slashed.group(3) or "").strip()
        if word in commands:
            return ParsedMessage(command=Command(word))
        if word in presets:
            return ParsedMessage(preset=word, question=rest)  # typed: it wins over a preset picked in a menu
        if mark == "/":  # "!wow, look" is a sentence; "/wow" a command the user mistyped
            raise KeyError(f"I don't know /{word}")
    if region := grounding.region_words(text, presets):  # identify 10 20 60 80: a command by its form
        return ParsedMessage(preset=region[0], question=region[1])
    if alone := _ALONE.match(text):
        word = alone.group(1).lower()
        if word in commands:
            return ParsedMessage(command=Command(word))
        if word in presets and explicit_preset is None:
            return ParsedMessage(preset=word)
    return ParsedMessage(preset=explicit_preset, question=text)
