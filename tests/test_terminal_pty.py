"""``minigpt4-bot chat`` / ``serve`` driven in a real pseudo-terminal (stdlib ``pty``): Ctrl-C is the byte the
terminal turns into SIGINT, the prompt is read by the real ``input()``, the log goes to the same terminal.

Each test starts the installed command on demo weights (written once per module into a shared data folder)
with its own SQLite database.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COMMAND = Path(sys.executable).with_name("minigpt4-bot")
CTRL_C = b"\x03"
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """One command in a pseudo-terminal: ``expect`` text on its screen, ``send`` keys, ``wait`` for its exit."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal (stdin, stdout, stderr)
            os.chdir(cwd)
            os.execv(args[0], args)
        self.screen = b""
        self.status: int | None = None

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the child closed the terminal
            return False
        self.screen += data
        return bool(data)

    def text(self, start: int = 0) -> str:
        """What the command printed since byte ``start``, without colours and cursor moves."""
        return ANSI.sub(b"", self.screen[start:]).decode(errors="replace").replace("\r", "")

    def expect(self, pattern: str, timeout: float = 120, start: int = 0) -> int:
        """Wait until ``pattern`` appears (colours aside) after byte ``start``; the screen's length then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pattern in self.text(start):
                return len(self.screen)
            if not self._read(0.2):
                break
        raise AssertionError(f"{pattern!r} did not appear; the screen:\n{self.text()[-3000:]}")

    def send(self, keys: bytes) -> int:
        """Type ``keys``; the screen offset before them (to expect what follows)."""
        mark = len(self.screen)
        os.write(self.fd, keys)
        return mark

    def wait(self, timeout: float) -> int | None:
        """The exit status if the command ended within ``timeout`` seconds, else None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            self._read(0.1)
        return None

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pty-data")


@pytest.fixture
def bot(tmp_path, data_dir):
    """Start ``minigpt4-bot ARGS`` with a bot.toml in ``tmp_path``; the terminal is closed after the test."""
    started: list[Terminal] = []
    config = tmp_path / "bot.toml"
    config.write_text(
        f'data_dir = "{data_dir}"\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "bot.db"}"\n'
        '[model]\ndevice = "cpu"\n'
        # long answers: min_length keeps the end-of-text token away, so Ctrl-C lands mid-answer
        "[generation]\nmax_new_tokens = 3000\nmin_length = 3000\nmax_length = 4000\n"
        "[render]\nenabled = false\n[web]\nport = 0\n"
    )

    def start(*args: str) -> Terminal:
        terminal = Terminal([str(COMMAND), *args, "--config", str(config)], cwd=tmp_path)
        started.append(terminal)
        return terminal

    yield start
    for terminal in started:
        terminal.close()


def _picture(folder: Path) -> Path:
    path = folder / "dish.png"
    Image.new("RGB", (64, 48), (250, 120, 0)).save(path)
    return path


def _answers(tmp_path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / "bot.db") as db:
        return db.execute("SELECT role, status FROM turns ORDER BY id").fetchall()


def test_ctrl_c_at_the_idle_prompt_ends_chat_at_once(bot):
    chat = bot("chat")
    chat.expect("you> ")
    chat.send(CTRL_C)
    assert chat.wait(10) == 0, f"still running 10 s after Ctrl-C:\n{chat.text()[-2000:]}"


def test_ctrl_c_ends_serve_with_the_terminal_chat(bot):
    serve = bot("serve", "--terminal")
    serve.expect("you> ")
    serve.send(CTRL_C)
    assert serve.wait(10) == 0, f"still running 10 s after Ctrl-C:\n{serve.text()[-2000:]}"
    assert "stopped" in serve.text()


def test_ctrl_c_during_an_answer_stops_just_that_answer(bot, tmp_path):
    chat = bot("chat")
    chat.expect("you> ")
    mark = chat.send(f"/image {_picture(tmp_path)} describe it\r".encode())
    chat.expect("bot> ", start=mark)
    time.sleep(0.5)  # some of the answer streamed
    mark = chat.send(CTRL_C)
    chat.expect("(answer stopped)", timeout=10, start=mark)
    chat.expect("you> ", timeout=10, start=mark)
    assert chat.wait(1) is None, "Ctrl-C during the answer ended the whole chat"
    chat.send(b"/quit\r")
    assert chat.wait(10) == 0
    assert _answers(tmp_path)[-1] == ("assistant", "interrupted")


def test_log_lines_do_not_repeat_the_users_error_after_the_prompt(bot):
    chat = bot("chat")
    chat.expect("you> ")
    mark = chat.send(b"what is this?\r")  # no picture yet: a notice for the user, an INFO line for the log
    chat.expect("you> ", timeout=30, start=mark)
    shown = chat.text(mark)
    assert shown.count("I need a picture") == 1, shown
    assert "NoImageError" not in shown
    chat.send(b"/quit\r")
    assert chat.wait(10) == 0
