"""The installed command with stderr in a pipe (as under Docker or systemd): log lines, the JSON format,
and ``serve`` refusing an unreachable database in one line before it loads the model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.http_helpers import closed_port

COMMAND = Path(sys.executable).with_name("minigpt4-bot")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (INFO|WARNING|ERROR) [\w.]+: ")


def _run(tmp_path: Path, toml: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    config = tmp_path / "bot.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n' + toml)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MINIGPT4_BOT_")} | (env or {})
    return subprocess.run(
        [str(COMMAND), *args, "--config", str(config)],
        capture_output=True, text=True, timeout=120, env=environ, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip


def test_logs_to_a_pipe_are_one_line_per_record_with_iso_time(tmp_path):
    url = f"postgresql://bot@127.0.0.1:{closed_port()}/{'a_long_database_name_' * 6}"  # longer than a terminal
    env = {"MINIGPT4_BOT_DATABASE_URL": url}
    result = _run(tmp_path, '[model]\ndevice = "cpu"\n', "serve", "--no-terminal", env=env)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(ISO.match(line) for line in lines), lines  # no blank, padded or continuation lines
    assert all(line == line.rstrip() for line in lines), "padded"
    assert any("cannot start" in line and "a_long_database_name_" * 6 in line for line in lines), lines


def test_serve_with_an_unreachable_database_is_one_json_line_before_the_model(tmp_path):
    url = f"postgresql://bot:s3cret-pw@127.0.0.1:{closed_port()}/minigpt4"
    result = _run(tmp_path, 'log_format = "json"\n[model]\ndevice = "cpu"\n', "serve", "--no-terminal",
                  env={"MINIGPT4_BOT_DATABASE_URL": url})  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "s3cret-pw" not in result.stderr + result.stdout
    records = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert len(records) == 1, result.stderr  # no weights loaded: no "demo weights" / "model" lines before it
    (record,) = records
    assert record["level"] == "ERROR" and set(record) == {"time", "level", "logger", "message"}
    assert "cannot start" in record["message"] and "bot:***@127.0.0.1" in record["message"]
    assert not (tmp_path / "data" / "demo-weights").exists()


def test_serve_without_a_platform_token_says_so_before_the_model(tmp_path):
    toml = '[model]\ndevice = "cpu"\n[slack]\nenabled = true\n[discord]\nenabled = true\n'
    env = {"SLACK_BOT_TOKEN": "", "SLACK_APP_TOKEN": "", "DISCORD_BOT_TOKEN": ""}
    result = _run(tmp_path, toml, "serve", "--no-terminal", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 2, result.stderr  # one line a front end, both told at once
    slack, discord = (next(line for line in errors if f"start: {name}:" in line) for name in ("slack", "discord"))
    assert "SLACK_BOT_TOKEN" in slack and "docs/slack.md" in slack
    assert "DISCORD_BOT_TOKEN" in discord and "docs/discord.md" in discord
    assert not (tmp_path / "data" / "demo-weights").exists()  # the model was never loaded
