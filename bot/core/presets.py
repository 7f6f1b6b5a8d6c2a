"""Presets: named prompts ("recipe", "poem", "website" …) a user can pick, overridable per workspace/channel.

With ``variant = "minigptv2"`` the model's task presets join them (``grounding``, ``refer``, ``detection``,
``identify``, ``vqa``, ``caption``: :data:`bot.core.grounding.TASK_PRESETS`); a ``[presets.prompts]`` entry
of the same name overrides one.  Which message names a preset is
:func:`bot.core.commands.parse_message`'s to say.
"""

from __future__ import annotations

from bot.core import grounding
from bot.core.commands import ParsedMessage
from bot.core.config import PresetSettings

__all__ = ["PresetBook"]


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

    def question(self, command: ParsedMessage, has_new_image: bool, workspace: str, channel: str) -> str:
        """The text sent to the model for a question (preset prompt + extra text, or the text itself)."""
        if command.preset:
            prompt = self.prompt(command.preset, workspace, channel)
            if command.preset in self.tasks:  # the words after a task tag; identify's as a box
                return grounding.task_question(command.preset, prompt, command.question)
            return f"{prompt} {command.question}".strip() if command.question else prompt
        if not command.question and has_new_image and self.settings.default:
            return self.prompt(self.settings.default, workspace, channel)
        return command.question
