"""Presets: named prompts ("recipe", "poem", "website" …) a user can pick, overridable per workspace/channel."""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.core.config import PresetSettings

__all__ = ["Command", "PresetBook", "parse_message"]

COMMANDS = ("help", "reset", "settings")


@dataclass(frozen=True)
class Command:
    """What a message asks for: a bot command, or a question (possibly through a preset)."""

    command: str | None = None  # help | reset | settings | None
    preset: str | None = None
    question: str = ""


_FIRST_WORD = re.compile(r"^\s*[/!]?([A-Za-z][\w-]*)\s*[:,]?\s*(.*)$", re.DOTALL)


class PresetBook:
    """Resolves preset names to prompts for a workspace and channel."""

    def __init__(self, settings: PresetSettings) -> None:
        self.settings = settings

    @property
    def names(self) -> list[str]:
        return list(self.settings.prompts)

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
            return self.settings.prompts[name]
        except KeyError:
            raise KeyError(f"unknown preset {name!r}; presets: {', '.join(self.names)}") from None

    def question(self, command: Command, has_new_image: bool, workspace: str, channel: str) -> str:
        """The text sent to the model for a question (preset prompt + extra text, or the text itself)."""
        if command.preset:
            prompt = self.prompt(command.preset, workspace, channel)
            return f"{prompt} {command.question}".strip() if command.question else prompt
        if not command.question and has_new_image and self.settings.default:
            return self.prompt(self.settings.default, workspace, channel)
        return command.question


def parse_message(text: str, presets: list[str], explicit_preset: str | None = None) -> Command:
    """Recognise ``help`` / ``reset`` / ``settings`` and a leading preset name; the rest is the question."""
    text = text.strip()
    match = _FIRST_WORD.match(text)
    if match:
        word, rest = match.group(1).lower(), match.group(2).strip()
        if word in COMMANDS and not rest:
            return Command(command=word)
        if word in presets and explicit_preset is None:
            return Command(preset=word, question=rest)
    if explicit_preset is not None and explicit_preset not in presets:
        raise KeyError(f"unknown preset {explicit_preset!r}")
    return Command(preset=explicit_preset, question=text)
