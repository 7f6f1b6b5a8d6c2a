"""Interactive terminal chat: the simplest front end, for operators and for trying the model.

Type a question after attaching an image with ``/image PATH`` (optionally followed by the
question).  ``/reset`` starts over, ``/help`` lists commands, ``/quit`` or Ctrl-D leaves.
The adapter only reads lines and renders text; the conversation lives in the session
object it is given.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from rich.console import Console

__all__ = ["ChatLike", "TerminalChat"]

log = logging.getLogger(__name__)

HELP = """Commands:
  /image PATH [question]   attach a picture (JPEG, PNG, GIF, WebP…); ask right away if a question follows
  /reset                   forget this conversation and its images
  /help                    show this help
  /quit                    leave (Ctrl-D works too)
Anything else is a question about the picture(s) attached so far."""


class ChatLike(Protocol):
    """What the terminal needs from a conversation (``model.chat.ChatSession`` provides it)."""

    @property
    def has_image(self) -> bool: ...

    def add_image(self, image: bytes) -> None: ...

    def ask(self, text: str) -> Iterator[str]: ...

    def reset(self) -> None: ...


class TerminalChat:
    """A read–answer loop over a :class:`ChatLike` session."""

    def __init__(
        self, session: ChatLike, console: Console | None = None, read_line: Callable[[str], str] = input
    ) -> None:
        self.session = session
        self.console = console or Console()
        self.read_line = read_line

    def run(self) -> None:
        """Loop until ``/quit`` or end of input; errors are reported and the loop goes on."""
        self.console.print("[bold]MiniGPT-4 terminal chat[/bold] — /help for commands")
        while True:
            try:
                line = self.read_line("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return
            try:
                self.handle(line)
            except Exception as exc:  # keep the chat alive; details to the log
                log.exception("terminal chat turn failed")
                self.console.print(f"[red]Sorry, that failed: {exc}[/red]")

    def handle(self, line: str) -> None:
        """Process one input line."""
        if line == "/help":
            self.console.print(HELP)
        elif line == "/reset":
            self.session.reset()
            self.console.print("Conversation cleared.")
        elif line.startswith("/image"):
            self._attach(line[len("/image") :].strip())
        elif line.startswith("/"):
            self.console.print(f"Unknown command {line.split()[0]!r}. {HELP}")
        elif not self.session.has_image:
            self.console.print("Attach a picture first: /image PATH [question]")
        else:
            self._answer(line)

    def _attach(self, rest: str) -> None:
        try:
            parts = shlex.split(rest)
        except ValueError:
            parts = rest.split()
        if not parts:
            self.console.print("Usage: /image PATH [question]")
            return
        path = Path(parts[0]).expanduser()
        if not path.is_file():
            self.console.print(f"[red]No such file: {path}[/red]")
            return
        try:
            self.session.add_image(path.read_bytes())
        except ValueError as exc:  # ImageDecodeError is a ValueError
            log.warning("rejected image %s: %s", path, exc)
            self.console.print(f"[red]{path.name} is not a picture I can read ({exc}).[/red]")
            return
        question = rest[len(parts[0]) :].strip().strip("\"'") if len(parts) > 1 else ""
        if question:
            self._answer(question)
        else:
            self.console.print(f"Got {path.name}. Ask me about it.")

    def _answer(self, question: str) -> None:
        self.console.print("bot> ", end="")
        for delta in self.session.ask(question):
            self.console.print(delta, end="", markup=False, highlight=False, soft_wrap=True)
        self.console.print()
