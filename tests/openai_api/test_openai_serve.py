"""The API as a user runs it: a real ``minigpt4-bot serve`` process (demo weights, the local engine, SQLite)
with ``[openai]`` enabled, a key made by ``minigpt4-bot admin keys create``, and the real ``openai`` SDK
(synchronous client, its default retries) asking about a picture, streaming, following up — then the key
revoked by ``admin keys revoke`` and refused by the running server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from openai_helpers import assistant, data_url, png, user

from tests.http_helpers import closed_port

ROOT = Path(__file__).resolve().parents[2]
KEY = re.compile(r"^(sk-\S+)$", re.M)


def _cli(config: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", *args, "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIGPT4_BOT_")}
    return env | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def served(tmp_path: Path):
    port = closed_port()
    config = tmp_path / "bot.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "state"}"\n[model]\ndevice = "cpu"\n'
        "[generation]\ndo_sample = false\nmax_new_tokens = 5\n[render]\nenabled = false\n"
        f"[web]\nenabled = false\n[openai]\nenabled = true\nport = {port}\n"
    )
    _cli(config, "admin", "db", "upgrade")
    created = _cli(config, "admin", "keys", "create", "--user", "alice", "--note", "serve test")
    key = KEY.search(created).group(1)
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "serve", "--no-terminal", "--config", str(config)],
        cwd=ROOT, env=_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=120)
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, f"serve exited early:\n{log.read_text()[-3000:]}"
        try:
            models = client.models.list()
            break
        except openai.APIConnectionError:
            assert time.monotonic() < deadline, f"serve never answered:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
    yield config, client, models, key, log
    process.terminate()
    assert process.wait(60) == 0, log.read_text()[-3000:]  # a clean stop on SIGTERM
    client.close()


def test_serve_answers_the_openai_sdk_with_a_key_from_the_admin_cli(served) -> None:
    config, client, models, key, log = served
    ids = [m.id for m in models.data]
    assert ids[0] == "minigpt4" and "minigpt4:recipe" in ids

    opening = user("What is in this picture?", data_url(png()))
    stream = client.chat.completions.create(
        model="minigpt4", messages=[opening], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].usage.completion_tokens >= 1 and chunks[-1].choices == []
    follow = client.chat.completions.create(model="minigpt4", messages=[opening, assistant(text), user("And?")])
    assert follow.choices[0].message.content.strip()
    assert follow.usage.prompt_tokens_details.cached_tokens >= chunks[-1].usage.prompt_tokens - 1

    listed = _cli(config, "admin", "conversations", "list")
    rows = [line for line in listed.splitlines() if "openai/default" in line]
    assert len(rows) == 1 and re.search(r"│\s+4 │", rows[0]), listed  # one conversation of 4 turns, not one per request
    key_id = re.search(r"│\s*(\d+) │", _cli(config, "admin", "keys", "list")).group(1)
    _cli(config, "admin", "keys", "revoke", key_id)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="minigpt4", messages=[user("Still there?")])
    assert key not in log.read_text()  # the key is never logged
