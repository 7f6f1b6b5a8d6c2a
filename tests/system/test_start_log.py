"""The start log of ``minigpt4-bot serve`` (issue 16): a handful of lines at INFO, everything at DEBUG.

Runs the real command as a subprocess on demo weights (written into a temporary ``data_dir`` on the
first start) with the web chat on a free port, waits for ``/healthz``, stops it with SIGTERM and reads
what it wrote on stderr.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# a record line: on a pipe the ISO time comes first (rich on a terminal starts with the level)
LEVEL_RE = re.compile(r"^(?:\S+T\S+ )?(?:\[[^\]]*\])?\s*(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path: Path, name: str, log_level: str, database: Path | None = None) -> tuple[str, int]:
    """Start ``serve``, wait until healthy, SIGTERM it; (its stderr, its port)."""
    port = _free_port()
    config = tmp_path / f"{name}.toml"
    text = f'data_dir = "{tmp_path / "state"}"\nlog_level = "{log_level}"\n[model]\ndevice = "cpu"\n'
    if database is not None:
        text += f'[database]\nurl = "sqlite:///{database}"\n'
    config.write_text(text + f'[web]\nhost = "127.0.0.1"\nport = {port}\n')
    stderr = tmp_path / f"{name}.stderr"
    # Wide lines: rich wraps log lines at the console width, which would split one record over several lines.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "1000", "TERM": "dumb"}
    env.pop("MINIGPT4_BOT_DATABASE_URL", None)
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "serve", "--no-terminal", "--config", str(config)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, f"serve exited early:\n{stderr.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"serve did not become healthy:\n{stderr.read_text()[-3000:]}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, stderr.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return stderr.read_text(encoding="utf-8", errors="replace"), port


def _records(log: str) -> list[tuple[str, str]]:
    """(level, line) for every line that starts a log record."""
    return [(m.group(1), line) for line in log.splitlines() if (m := LEVEL_RE.match(line))]


def test_start_log_is_short_at_info_and_complete_at_debug(tmp_path: Path) -> None:
    log, port = _serve(tmp_path, "info", "INFO")
    records = _records(log)
    assert "setup plugin alembic" not in log and "Context impl" not in log and "Running upgrade" not in log, log
    assert not [line for _, line in records if "alembic" in line], log
    assert "it/s]" not in log, log  # no tqdm progress bars from transformers
    assert "Traceback" not in log, log
    assert log.count("No weights configured") == 1, log  # the demo-weights warning, once
    assert log.count(f"web chat on http://127.0.0.1:{port}/") == 1, log
    assert len([1 for _, line in records if "model vicuna0 (demo weights) on cpu, float32: " in line]) == 1, log
    assert len([1 for _, line in records if "database sqlite" in line and "(schema " in line]) == 1, log
    info = [line for level, line in records if level == "INFO"]
    assert len(info) < 12, "\n".join(info)
    assert [level for level, _ in records if level in ("ERROR", "CRITICAL")] == [], log

    # DEBUG shows the libraries too: alembic's lines (a fresh database, so the migrations run).
    debug_log, _ = _serve(tmp_path, "debug", "DEBUG", database=tmp_path / "debug.db")
    assert "Context impl SQLiteImpl" in debug_log and "Running upgrade" in debug_log, debug_log[-3000:]
    assert debug_log.count("No weights configured") == 1, debug_log[-3000:]
