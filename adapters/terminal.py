"""Interactive terminal chat through the bot core (same storage, quotas and presets as every front end).

Attach pictures with ``/image PATH [question]``, then ask; follow-ups continue the thread.
``/new`` starts a new thread, ``/reset`` starts this one over, ``/help`` lists commands,
``/quit`` or Ctrl-D leaves.  Registered as the ``terminal`` front end (``[terminal]`` in bot.toml):
``enabled = "auto"`` starts it when ``serve`` runs in a terminal; leaving it ends ``serve`` when it is
the only front end running.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import shlex
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from bot.core.api import Core, FrontEndContext, FrontEndPlugin, FrontEndSettings
from bot.core.requests import Delta, Final, ImageAttachment, ReplyEvent, ReplyFile, Request

__all__ = ["FRONT_END", "TerminalChat", "TerminalFrontEnd", "TerminalSettings"]

log = logging.getLogger(__name__)

HELP = """Terminal commands:
  /image PATH [question]   attach a picture (JPEG, PNG, GIF, WebP); ask right away if a question follows
  /new                     start a new thread
  /reset                   start this thread over
  /help                    this help (say `help` for the bot's own help)
  /quit                    leave (Ctrl-D works too)
Anything else is sent to the bot, with the pictures attached since your last message."""

Handler = Callable[[Request], AsyncIterator[ReplyEvent]]


class TerminalChat:
    """A read–answer loop that turns lines into :class:`~bot.core.requests.Request` objects."""

    def __init__(
        self,
        handle: Handler,
        console: Console | None = None,
        read_line: Callable[[str], str] = input,
        user: str | None = None,
        files_dir: Path | None = None,
    ) -> None:
        self.handle = handle
        self.files_dir = files_dir or Path("data") / "files"
        self.console = console or Console()
        self.read_line = read_line
        self.user = user or _user()
        self.thread = uuid.uuid4().hex
        self.pending: list[ImageAttachment] = []

    async def run(self) -> None:
        """Loop until ``/quit`` or end of input; a failing turn is reported and the loop goes on."""
        self.console.print("[bold]MiniGPT-4 terminal chat[/bold] — /help for commands")
        while True:
            try:
                line = (await asyncio.to_thread(self.read_line, "you> ")).strip()
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            if line in ("/quit", "/exit"):
                return
            if line:
                try:
                    await self.on_line(line)
                except Exception as exc:  # keep the chat alive; details to the log
                    log.exception("terminal turn failed")
                    self.console.print(f"[red]Sorry, that failed: {exc}[/red]")

    async def on_line(self, line: str) -> None:
        if line == "/help":
            self.console.print(HELP, markup=False)
        elif line == "/new":
            self.thread, self.pending = uuid.uuid4().hex, []
            self.console.print("New thread.")
        elif line == "/reset":
            await self.send("reset")
        elif line.startswith("/image"):
            question = self._attach(line[len("/image") :].strip())
            if question:
                await self.send(question)
        elif line.startswith("/"):
            self.console.print(f"Unknown command {line.split()[0]!r}. /help lists them.")
        else:
            await self.send(line)

    def _attach(self, rest: str) -> str:
        try:
            parts = shlex.split(rest)
        except ValueError:
            parts = rest.split()
        if not parts:
            self.console.print("Usage: /image PATH [question]")
            return ""
        path = Path(parts[0]).expanduser()
        if not path.is_file():
            self.console.print(f"[red]No such file: {path}[/red]")
            return ""
        self.pending.append(ImageAttachment(path.read_bytes(), filename=path.name))
        question = " ".join(parts[1:])
        if not question:
            self.console.print(f"Attached {path.name}; it goes with your next message.")
        return question

    async def send(self, text: str) -> None:
        images, self.pending = tuple(self.pending), []
        request = Request(
            platform="terminal", workspace="local", channel="terminal", thread=self.thread,
            user=self.user, text=text, images=images, event_id=uuid.uuid4().hex,
        )  # fmt: skip
        streamed = False
        async for event in self.handle(request):
            if isinstance(event, Delta):
                if not streamed:
                    self.console.print("bot> ", end="")
                    streamed = True
                self.console.print(event.text, end="", markup=False, highlight=False, soft_wrap=True)
            elif isinstance(event, Final):
                if streamed:
                    self.console.print()
                elif event.kind == "answer":
                    self.console.print("bot> " + event.text, markup=False, highlight=False)
                else:
                    style = "red" if event.kind == "error" else "yellow"
                    self.console.print(event.text, style=style, markup=False, highlight=False)
                if event.files:
                    self._save(event.files, event.meta.get("turn_id"))

    def _save(self, files: tuple[ReplyFile, ...], turn_id: object) -> None:
        """Files that come with an answer (a website preview and its page) are saved; their paths printed."""
        folder = self.files_dir / self.thread
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for file in files:
                path = folder / f"{turn_id or uuid.uuid4().hex[:8]}-{Path(file.filename).name}"
                path.write_bytes(file.data)
                self.console.print(f"saved {file.title or file.filename}: {path}", markup=False, highlight=False)
        except OSError as exc:
            log.warning("saving reply files under %s failed: %s", folder, exc)
            self.console.print(f"Could not save the files under {folder}: {exc.strerror}", style="red", markup=False)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "local"


class TerminalSettings(FrontEndSettings):
    """``[terminal]``: the terminal chat; ``"auto"`` = when ``serve`` runs in an interactive terminal."""

    enabled: bool | Literal["auto"] = "auto"


class TerminalFrontEnd:
    """The terminal chat as a :class:`~bot.core.api.FrontEnd` (a task reading stdin)."""

    name = "terminal"

    def __init__(self, core: Core, context: FrontEndContext, chat: TerminalChat | None = None) -> None:
        self.chat = chat or TerminalChat(core.handle, files_dir=context.data_dir / "files")
        self.context = context
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.chat.run())
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            self.context.request_stop(self.name)  # the user left the chat

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def problem(self) -> str | None:
        return None  # a local prompt: nothing to lose a connection to


def _enabled(settings: TerminalSettings, context: FrontEndContext) -> bool:
    return context.interactive if settings.enabled == "auto" else bool(settings.enabled)


def _create(core: Core, _settings: Any, context: FrontEndContext) -> TerminalFrontEnd:
    return TerminalFrontEnd(core, context)


FRONT_END = FrontEndPlugin(
    name="terminal",
    settings=TerminalSettings,
    create=_create,
    enabled=_enabled,
    docs="docs/adapters.md",
    start_order=100,  # its prompt comes after the other front ends' start-up lines
)
