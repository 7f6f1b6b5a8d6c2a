"""Presets: named prompts ("recipe", "poem", "website" …) a user can pick, overridable per workspace/channel.

With ``variant = "minigptv2"`` the model's task presets join them (``grounding``, ``refer``, ``detection``,
``identify``, ``vqa``, ``caption``: :data:`bot.core.grounding.TASK_PRESETS`); a ``[presets.prompts]`` entry
of the same name overrides one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.core import grounding
from bot.core.config import PresetSettings

__all__ = ["Command", "PresetBook", "parse_message"]

COMMANDS = ("help", "reset", "settings")


@dataclass(frozen=True)
class Command:
    """What a message asks for: a bot command, or a question (possibly through a preset)."""

    command: str | None = None  # help | reset | settings | None
    preset: str | None = None
    question: str = ""


_SLASHED = re.compile(r"^([/!])([A-Za-z][\w-]*)(?:\s+(.*))?$", re.DOTALL)
"""``/story about a cat`` (or ``!story …`` where the chat app keeps ``/`` for its own commands)."""
_ALONE = re.compile(r"^([A-Za-z][\w-]*)\s*[.!?:]?$")
"""A message that is one word (``story``, ``Help?``)."""


class PresetBook:
    """Resolves preset names to prompts for a workspace and channel."""

    def __init__(self, settings: PresetSettings, variant: str = "") -> None:
        self.settings = settings
        tasks = grounding.TASK_PRESETS if variant == "minigptv2" else {}
        self.tasks = {name: prompt for name, prompt in tasks.items() if name not in settings.prompts}
        """MiniGPT-v2's task presets that the configured prompts leave as the model's own."""

    @property
    def names(self) -> list[str]:
        return [*self.settings.prompts, *self.tasks]

    def prompt(self, name: str, workspace: str = "", channel: str = "") -> str:
        """The prompt for ``name`` here; the most specific override wins (channel, then workspace)."""
        best: tuple[int, str] | None = None
        for o in self.settings.overrides:
            if o.name != name or (o.workspace and o.workspace != workspace) or (o.channel and o.channel != channel):
                continue
            rank = (2 if o.channel else 0) + (1 if o.workspace else 0)
            if best is None or rank > best[0]:
                best = (rank, o.prompt)
        if best is not None:
            return best[1]
        try:
            return self.settings.prompts[name] if name in self.settings.prompts else self.tasks[name]
        except KeyError:
            raise KeyError(f"unknown preset {name!r}; presets: {', '.join(self.names)}") from None

    def question(self, command: Command, has_new_image: bool, workspace: str, channel: str) -> str:
        """The text sent to the model for a question (preset prompt + extra text, or the text itself)."""
        if command.preset:
            prompt = self.prompt(command.preset, workspace, channel)
            if command.preset in self.tasks:  # the words after a task tag; identify's as a box
                return grounding.task_question(command.preset, prompt, command.question)
            return f"{prompt} {command.question}".strip() if command.question else prompt
        if not command.question and has_new_image and self.settings.default:
            return self.prompt(self.settings.default, workspace, channel)
        return command.question


def parse_message(text: str, presets: list[str], explicit_preset: str | None = None) -> Command:
    """What a message asks for.  A preset or a command is one only as a command: the message is exactly its
    name (``story``, ``help``), or starts with a slash (``/story about a cat``, ``!story …``; the words after
    it are added to the preset's prompt), or the front end picked the preset for this message
    (``explicit_preset``: a menu or a command option of the front end).  Anything else is a plain question, so "Describe
    the roof please" or "Story time: tell me one" are asked as written.  Raises ``KeyError`` (a message
    for the user) for an unknown ``/word`` or an unknown explicit preset."""
    text = text.strip()
    if explicit_preset is not None and explicit_preset not in presets:
        raise KeyError(f"unknown preset {explicit_preset!r}")
    if slashed := _SLASHED.match(text):
        mark, word, rest = slashed.group(1), slashed.group(2).lower(), (slashed.group(3) or "").strip()
        if word in COMMANDS:
            return Command(command=word)
        if word in presets:
            return Command(preset=word, question=rest)  # typed: it wins over a preset picked in a menu
        if mark == "/":  # "!wow, look" is a sentence; "/wow" a command the user mistyped
            raise KeyError(f"I don't know /{word}")
    if region := grounding.region_words(text, presets):  # identify 10 20 60 80: a command by its form
        return Command(preset=region[0], question=region[1])
    if alone := _ALONE.match(text):
        word = alone.group(1).lower()
        if word in COMMANDS:
            return Command(command=word)
        if word in presets and explicit_preset is None:
            return Command(preset=word)
    return Command(preset=explicit_preset, question=text)
