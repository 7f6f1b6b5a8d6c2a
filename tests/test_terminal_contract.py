"""The front-end contract suite (``tests/contracts/front_end_contract.py``) on the terminal chat: the real
``TerminalChat`` reading lines (fed from here, in the daemon thread it reads input in) and writing to a
rich ``Console`` whose every write is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import io
import queue
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from rich.console import Console

from adapters.terminal import TerminalChat
from bot.core.config import Settings
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.contracts.front_end_contract import FrontEndContract, Reply
from tests.scripted_backend import ScriptedBackend

BOT = "bot> "


class Screen(io.StringIO):
    """The terminal: every write, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


class TerminalDriver:
    names_files = True

    def __init__(self, chat: TerminalChat, screen: Screen, service: BotService, url: str, folder: Path) -> None:
        self.chat, self.screen, self.service, self.database_url, self.folder = chat, screen, service, url, folder
        self.lines: queue.Queue[str] = queue.Queue()
        self.prompts = 0  # how often the chat asked for a line: one more than the lines typed once all are answered
        self.typed = 0

    def read_line(self, _prompt: str) -> str:
        self.prompts += 1
        line = self.lines.get()
        if line == "\x04":
            raise EOFError
        return line

    async def _type(self, line: str) -> list[str]:
        """Type ``line``; the writes until the chat asks for the next one."""
        for _ in range(200):  # the chat is at its prompt (the banner and the previous answer written)
            if self.prompts > self.typed:
                break
            await asyncio.sleep(0.05)
        seen = len(self.screen.writes)
        self.typed += 1
        self.lines.put(line)
        for _ in range(600):
            if self.prompts > self.typed:
                return self.screen.writes[seen:]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no prompt after {line!r}: {self.screen.writes[seen:]}")

    def _file(self, data: bytes, name: str) -> Path:
        path = self.folder / uuid.uuid4().hex[:6] / name
        path.parent.mkdir()
        path.write_bytes(data)
        return path

    async def _answer(self, line: str) -> Reply:
        writes = await self._type(line)
        start = writes.index(BOT) + 1
        versions, shown = [], ""
        for text in writes[start:]:
            if text.startswith("\n"):
                break
            shown += text
            versions.append(shown)
        return Reply(versions)

    async def ask(self, question: str, picture: bytes) -> Reply:
        return await self._answer(f"/image {self._file(picture, 'picture.png')} {question}")

    async def follow_up(self, question: str) -> Reply:
        return await self._answer(question)

    async def refused(self, question: str, data: bytes, filename: str) -> str:
        return "".join(await self._type(f"/image {self._file(data, filename)} {question}"))


class TestTerminalFrontEnd(FrontEndContract):
    @contextlib.asynccontextmanager
    async def running(self, folder: Path, backend: ScriptedBackend) -> AsyncIterator[TerminalDriver]:
        url = sqlite_url(folder / "terminal.db")
        db = Database(url)
        await db.create_all()
        settings = Settings.model_validate({"generation": {"max_new_tokens": 8}, "render": {"enabled": False}})
        service = BotService(settings, db, backend)
        screen = Screen()
        driver = TerminalDriver(None, screen, service, url, folder)  # type: ignore[arg-type]
        driver.chat = TerminalChat(service.handle, Console(file=screen, width=400), driver.read_line, user="tester",
                                   files_dir=folder / "files", log_on_screen=False)  # fmt: skip
        task = asyncio.create_task(driver.chat.run())
        try:
            yield driver
        finally:
            driver.lines.put("\x04")  # end of input: the chat returns
            await asyncio.wait_for(task, 10)
            await service.close()
            await db.dispose()
