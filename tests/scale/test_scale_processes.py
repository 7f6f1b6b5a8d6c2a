"""Several bot processes on one PostgreSQL: two real ``minigpt4-bot serve`` processes (web front end on two
ports, demo weights, the local engine each) share one throwaway PostgreSQL and receive the same events,
as a platform that retries a delivery on another connection would send them.

What must hold with no in-process state: each event is answered by exactly one process (the other sees a
redelivery: the ``processed_events`` primary key), and the usage ledger — what quotas count — has exactly
one row per admitted request, reserved in the same transaction as the quota check, so a quota of N answers
N requests of a user however the events are spread, and however many arrive at the same moment.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg

from storage.migrate import upgrade
from tests.http_helpers import multipart
from tests.pg import create_database
from tests.pictures import png

ROOT = Path(__file__).resolve().parents[2]
QUOTA = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, fields: dict[str, str], image: bytes | None = None) -> tuple[str, dict[str, Any]]:
    """The last server-sent event of one message: ``("final", {...})`` or ``("duplicate", {...})``."""
    body, ctype = multipart(fields, image)
    headers = {"Content-Type": ctype, "X-Test-User": fields["user"]}  # as a login proxy would say who it is
    request = urllib.request.Request(url + "/api/messages", data=body, headers=headers)
    last: tuple[str, dict[str, Any]] = ("", {})
    name = ""
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                last = (name, json.loads(line[6:]))
    return last


class Bot:
    """One ``serve`` process with its own data folder and web port, on the shared database."""

    def __init__(self, folder: Path, database: str) -> None:
        folder.mkdir()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "serve.log"
        config = folder / "bot.toml"
        config.write_text(
            f'data_dir = "{folder / "state"}"\n'
            f'[model]\ndevice = "cpu"\n'
            f"[generation]\ndo_sample = false\nmax_new_tokens = 4\n"
            f'[database]\nurl = "{database}"\n'
            f"[quotas.user]\nrequests_per_day = {QUOTA}\nimages_per_day = 0\n"
            f"[render]\nenabled = false\n"
            f'[web]\nhost = "127.0.0.1"\nport = {self.port}\nuser_header = "X-Test-User"\n'
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        env.pop("MINIGPT4_BOT_DATABASE_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "serve", "--no-terminal", "--config", str(config)],
            cwd=ROOT, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited early:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"serve did not become healthy:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def _png() -> bytes:
    return png((200, 30, 30), (64, 64))


def _to_both(bots: list[Bot], fields: dict[str, str], image: bytes | None) -> list[Any]:
    """Deliver one event to both processes at the same moment."""
    with ThreadPoolExecutor(max_workers=len(bots)) as pool:
        return [f.result() for f in [pool.submit(_post, bot.url, fields, image) for bot in bots]]


def _query(url: str, sql: str) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    return asyncio.run(run())


def test_scale_two_serve_processes_on_one_postgresql_answer_each_event_once_and_count_quota_exactly(
    postgres_url: str, tmp_path: Path
) -> None:
    url = create_database(postgres_url, f"scale_bots_{os.getpid()}")
    upgrade(url)  # the operator migrates once (`minigpt4-bot admin db upgrade`), then starts the processes
    plain = url.replace("postgresql+asyncpg://", "postgresql://")
    bots = [Bot(tmp_path / "a", plain), Bot(tmp_path / "b", plain)]
    image = _png()
    try:
        for bot in bots:
            bot.wait_healthy()
        with ThreadPoolExecutor(max_workers=8) as pool:
            # A burst: eight users' first messages, each event delivered to both processes, all at once.
            burst = {
                f"burst-{i}": pool.submit(_to_both, bots, {"thread": f"burst-{i}", "text": "What is this?",
                                                               "event_id": f"burst-{i}", "user": f"user{i}"}, image)
                for i in range(8)
            }  # fmt: skip
            for event, future in burst.items():
                kinds = sorted(name for name, _ in future.result())
                assert kinds == ["duplicate", "final"], (event, future.result())
                (final,) = [data for name, data in future.result() if name == "final"]
                assert final["kind"] == "answer", final

            # One user, one thread, six events in turn, each to both processes: QUOTA answered, then refused.
            outcomes = []
            for i in range(6):
                fields = {"thread": "alice-thread", "text": "Tell me more.", "event_id": f"alice-{i}", "user": "alice"}
                replies = _to_both(bots, fields, image if i == 0 else None)
                assert sorted(name for name, _ in replies) == ["duplicate", "final"], replies
                outcomes.append(next(data for name, data in replies if name == "final"))
        assert [o["kind"] for o in outcomes] == ["answer"] * QUOTA + ["error"] * (6 - QUOTA), outcomes
        assert all(f"limit of {QUOTA} requests per day" in o["text"] for o in outcomes[QUOTA:])

        # Another user, six threads, all at once, each event to both processes (twelve deliveries in flight):
        # the quota is checked and reserved in one transaction per request, so exactly QUOTA get through.
        with ThreadPoolExecutor(max_workers=6) as pool:
            fields = [{"thread": f"bob-{i}", "text": "What is this?", "event_id": f"bob-{i}", "user": "bob"}
                      for i in range(6)]  # fmt: skip
            at_once = [f.result() for f in [pool.submit(_to_both, bots, f, image) for f in fields]]
        for replies in at_once:
            assert sorted(name for name, _ in replies) == ["duplicate", "final"], replies
        finals = [data for replies in at_once for name, data in replies if name == "final"]
        assert sorted(f["kind"] for f in finals) == ["answer"] * QUOTA + ["error"] * (6 - QUOTA), finals
        assert all(f"limit of {QUOTA} requests per day" in f["text"] for f in finals if f["kind"] == "error")
    finally:
        codes = [bot.stop() for bot in bots]
    assert codes == [0, 0], [bot.log.read_text()[-2000:] for bot in bots]

    ledger = {r["user_id"]: r["requests"] for r in _query(url, "SELECT user_id, sum(requests) AS requests "
                                                               "FROM usage_ledger GROUP BY user_id")}  # fmt: skip
    assert ledger == {"alice": QUOTA, "bob": QUOTA, **{f"user{i}": 1 for i in range(8)}}
    events = _query(url, "SELECT count(*) AS n FROM processed_events")[0]["n"]
    assert events == 8 + 6 + 6
    turns = _query(url, "SELECT status, count(*) AS n FROM turns WHERE role = 'assistant' GROUP BY status")
    assert {r["status"]: r["n"] for r in turns} == {"done": 8 + 2 * QUOTA}  # no answer stored twice, none left over
