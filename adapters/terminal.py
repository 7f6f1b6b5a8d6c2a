"""Interactive terminal chat through the bot core (same storage, quotas and presets as every front end).

Attach pictures with ``/image PATH [question]``, then ask; follow-ups continue the thread.
``/new`` starts a new thread, ``/reset`` starts this one over, ``/help`` lists commands,
``/quit``, Ctrl-D or Ctrl-C at the prompt leaves; Ctrl-C while an answer is written stops just that
answer (the core keeps it as ``interrupted``) and the prompt comes back.  Registered as the ``terminal``
front end (``[terminal]`` in bot.toml): ``enabled = "auto"`` starts it when ``serve`` runs in a terminal;
leaving it ends ``serve`` when it is the only front end running.

The prompt is read in a daemon thread, so a Ctrl-C that ends the bot never waits for Enter, and log
lines printed while the prompt waits clear the input line first and redraw the prompt after.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import getpass
import logging
import shlex
import sys
import threading
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.text import Text

from bot.core.frontend_api import Core, FrontEndContext, FrontEndPlugin, FrontEndSettings
from bot.core.grounding import bold_spans
from bot.core.requests import Command, Delta, Final, ImageAttachment, ReplyEvent, ReplyFile, Request

__all__ = ["FRONT_END", "TerminalChat", "TerminalFrontEnd", "TerminalSettings"]

log = logging.getLogger(__name__)

HELP = """Terminal commands:
  /image PATH [question]   attach a picture{formats}; ask right away if a question follows
  /new                     start a new thread
  /reset                   start this thread over
  /help                    this help (say "help" for the bot's own help)
  /quit                    leave (Ctrl-D, or Ctrl-C at the prompt, works too)
Ctrl-C while an answer is written stops that answer.
Anything else is sent to the bot, with the pictures attached since your last message."""

Handler = Callable[[Request], AsyncGenerator[ReplyEvent, None]]
PROMPT = "you> "
CLEAR_LINE = "\r\x1b[2K"  # carriage return + erase the whole line
_OWN_TURN: contextvars.ContextVar[bool] = contextvars.ContextVar("terminal_turn", default=False)


def read_input(prompt: str) -> str:
    """``input`` with line editing and history (readline) when stdin is a terminal."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # not on every platform; plain input() still works
            import readline  # noqa: F401  (importing it is what gives input() line editing)
    return input(prompt)


def _typed_so_far() -> str:
    """What the user has typed at the prompt (readline's buffer), to redraw it after a log line."""
    readline = sys.modules.get("readline")
    return readline.get_line_buffer() if readline is not None else ""


async def _read_in_daemon_thread(read_line: Callable[[str], str], prompt: str) -> str:
    """``read_line(prompt)`` in a daemon thread: unlike ``asyncio.to_thread`` (the loop's executor, joined
    at exit), a reader still blocked in ``input()`` never keeps the process alive after the bot stopped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def deliver(result: str | None, error: BaseException | None) -> None:
        if future.done():
            return  # the chat was cancelled meanwhile
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or "")

    def read() -> None:
        result, error = None, None
        try:
            result = read_line(prompt)
        except BaseException as exc:  # EOFError, KeyboardInterrupt: the loop decides
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: the bot has stopped
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=read, name="terminal-input", daemon=True).start()
    return await future


class _ChatLogHandler(logging.Handler):
    """Puts the root logger's handlers behind the chat while it runs on the log's terminal.

    A record printed while the prompt waits clears the input line first and redraws the prompt and
    what was typed after; one printed mid-answer starts on its own line.  Records below WARNING logged
    by the user's own turn (``NoImageError for terminal/…``) are left out: the chat shows that already.
    """

    def __init__(self, chat: TerminalChat, inner: list[logging.Handler]) -> None:
        super().__init__()
        self.chat, self.inner = chat, inner

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and _OWN_TURN.get():
            return
        with self.chat.screen:
            self.chat.before_log()
            for handler in self.inner:
                if record.levelno >= handler.level:
                    handler.handle(record)
            self.chat.after_log()


def _rewritten(shown: str, final: str) -> str:
    """What to print after a streamed answer whose final text differs: the note the core added to it (a
    cut thread, a repaired page), or the whole final text when the core rewrote it (boxes taken out)."""
    shown, final = shown.strip(), final.strip()
    if final == shown:
        return ""
    return final[len(shown) :].strip() if final.startswith(shown) else "bot> " + final


def _styled(text: str) -> Text:
    """An answer for the console: ``**phrase**`` (the phrases of an answer with boxes) in bold on a terminal,
    plain words without the asterisks on a pipe or file (rich drops the style there); never rich markup."""
    styled = Text()
    for part, bold in bold_spans(text):
        styled.append(part, style="bold" if bold else None)
    return styled


class TerminalChat:
    """A read–answer loop that turns lines into :class:`~bot.core.requests.Request` objects."""

    def __init__(
        self,
        handle: Handler,
        console: Console | None = None,
        read_line: Callable[[str], str] = read_input,
        user: str | None = None,
        files_dir: Path | None = None,
        log_on_screen: bool | None = None,
        formats: str = "",
    ) -> None:
        self.handle = handle
        self.formats = formats  # the picture formats the core reads, for /help (ImageLimits.formats_text)
        self.files_dir = files_dir or Path("data") / "files"
        self.console = console or Console()
        self.read_line = read_line
        # whether log records land on this chat's screen (default: both the chat and stderr are terminals)
        on_screen = self.console.is_terminal and sys.stderr.isatty()
        self.log_on_screen = on_screen if log_on_screen is None else log_on_screen
        self.user = user or _user()
        self.thread = uuid.uuid4().hex
        self.pending: list[ImageAttachment] = []
        self.screen = threading.RLock()  # the prompt line is shared with log records from any thread
        self._line: Literal["prompt", "answer"] | None = None  # what the cursor's line shows
        self._turn: asyncio.Task[None] | None = None

    def interrupt(self) -> bool:
        """Ctrl-C: stop the answer being written and return True; False when idle at the prompt (quit)."""
        if self._turn is None or self._turn.done():
            return False
        self._turn.cancel()
        return True

    async def run(self) -> None:
        """Loop until ``/quit`` or end of input; a failing turn is reported and the loop goes on."""
        self.console.print("[bold]MiniGPT-4 terminal chat[/bold] — /help for commands")
        with self._logs_through_chat(), _terminal_modes_kept():
            while True:
                try:
                    self._line = "prompt"
                    line = (await _read_in_daemon_thread(self.read_line, PROMPT)).strip()
                except (EOFError, KeyboardInterrupt):
                    self.console.print()
                    return
                except asyncio.CancelledError:  # the bot stops (Ctrl-C at the prompt): end the prompt's line
                    self.console.print()
                    raise
                finally:
                    self._line = None
                if line in ("/quit", "/exit"):
                    return
                if line:
                    await self._run_turn(line)

    async def _run_turn(self, line: str) -> None:
        """One line as its own task, so Ctrl-C (:meth:`interrupt`) cancels it and not the chat."""
        self._turn = asyncio.create_task(self._own_turn(line))
        try:
            await self._turn
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the chat itself is being stopped
            self._end_answer_line()
            self.console.print("(answer stopped)", style="yellow")
        except Exception as exc:  # keep the chat alive; details to the log
            log.exception("terminal turn failed")
            self._end_answer_line()
            self.console.print(f"Sorry, that failed: {exc}", style="red", markup=False)
        finally:
            self._turn = None

    async def _own_turn(self, line: str) -> None:
        _OWN_TURN.set(True)  # this task's context only: the log handler leaves its INFO echoes out
        await self.on_line(line)

    def _end_answer_line(self) -> None:
        if self._line == "answer":
            self.console.print()
            self._line = None

    def before_log(self) -> None:
        """A log record is about to be printed: give it a line of its own."""
        if self._line == "prompt":
            self.console.file.write(CLEAR_LINE)
        elif self._line == "answer":
            self.console.file.write("\n")
        self.console.file.flush()

    def after_log(self) -> None:
        """Redraw the prompt with what was typed, or the answer's prefix, below the record."""
        if self._line == "prompt":
            self.console.file.write(PROMPT + _typed_so_far())
        elif self._line == "answer":
            self.console.file.write("bot> ")
        self.console.file.flush()

    @contextlib.contextmanager
    def _logs_through_chat(self) -> Iterator[None]:
        """While the chat runs on the terminal the log writes to, route the root handlers through it."""
        root = logging.getLogger()
        if not self.log_on_screen or not root.handlers:
            yield
            return
        inner = list(root.handlers)
        wrapper = _ChatLogHandler(self, inner)
        for handler in inner:
            root.removeHandler(handler)
        root.addHandler(wrapper)
        try:
            yield
        finally:
            root.removeHandler(wrapper)
            for handler in inner:
                root.addHandler(handler)

    async def on_line(self, line: str) -> None:
        if line == "/help":
            self.console.print(HELP.format(formats=f" ({self.formats})" if self.formats else ""), markup=False)
        elif line == "/new":
            self.thread, self.pending = uuid.uuid4().hex, []
            self.console.print("New thread.")
        elif line == "/reset":
            await self.send("", command=Command.RESET)
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

    async def send(self, text: str, command: Command | None = None) -> None:
        images, self.pending = tuple(self.pending), []
        request = Request(
            platform="terminal", workspace="local", channel="terminal", thread=self.thread,
            user=self.user, text=text, images=images, event_id=uuid.uuid4().hex, command=command,
        )  # fmt: skip
        streamed, shown = False, []
        async with aclosing(self.handle(request)) as events:  # Ctrl-C closes the answer: stored as interrupted
            async for event in events:
                if isinstance(event, Delta):
                    with self.screen:
                        if not streamed:
                            self.console.print("bot> ", end="")
                            streamed, self._line = True, "answer"
                        self.console.print(event.text, end="", markup=False, highlight=False, soft_wrap=True)
                        shown.append(event.text)
                elif isinstance(event, Final):
                    self._final(event, streamed, "".join(shown))

    def _final(self, event: Final, streamed: bool, shown: str = "") -> None:
        with self.screen:
            if streamed:
                self._end_answer_line()
                if event.kind == "answer" and (added := _rewritten(shown, event.text)):
                    self.console.print(_styled(added), highlight=False)
            elif event.kind == "answer":
                self.console.print(_styled("bot> " + event.text), highlight=False)
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


@contextlib.contextmanager
def _terminal_modes_kept() -> Iterator[None]:
    """Restore the terminal's modes on the way out: a reader left in readline must not leave it raw."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):  # not a terminal (tests, pipes), or Windows
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "local"


class TerminalSettings(FrontEndSettings[bool | Literal["auto"]]):
    """``[terminal]``: the terminal chat; ``"auto"`` = when ``serve`` runs in an interactive terminal."""

    enabled: bool | Literal["auto"] = "auto"


class TerminalFrontEnd:
    """The terminal chat as a :class:`~bot.core.frontend_api.FrontEnd` (a task reading stdin)."""

    name = "terminal"

    def __init__(self, core: Core, context: FrontEndContext, chat: TerminalChat | None = None) -> None:
        formats = core.image_limits.formats_text()
        self.chat = chat or TerminalChat(core.handle, files_dir=context.data_dir / "files", formats=formats)
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

    def interrupt(self) -> bool:
        """Ctrl-C (``serve`` asks each front end): stop the answer being written; False when idle."""
        return self.chat.interrupt()


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
    case_insensitive_users=True,  # the operating system's account name
)
