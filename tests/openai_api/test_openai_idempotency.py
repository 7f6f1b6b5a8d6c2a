"""``Idempotency-Key`` through the real ``openai`` client (``extra_headers``) against the loopback server: a
client's retry is answered and charged once, the key is scoped to its user, and a retry whose first attempt
failed is answered."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from openai_helpers import Api, data_url, png, running_api, user

from model.engine.contract import Busy, RequestFailed
from tests.scripted_backend import ScriptedBackend


async def ask(api: Api, key: str | None = None, idempotency: str = "retry-1") -> str | None:
    reply = await api.client(key).chat.completions.create(
        model="minigpt4", messages=[user("What is it?", data_url(png()))],
        extra_headers={"Idempotency-Key": idempotency},
    )  # fmt: skip
    return reply.choices[0].message.content


async def requests_of(api: Api, name: str, workspace: str = "acme") -> int:
    return (await api.db.usage_since("openai", workspace, name, api.db.now() - timedelta(days=1))).requests


def test_the_same_key_twice_is_answered_and_charged_once(tmp_path: Path) -> None:
    async def main() -> None:
        backend = ScriptedBackend("A red square.")
        async with running_api(tmp_path, backend) as api:
            assert await ask(api) == "A red square."
            with pytest.raises(openai.ConflictError) as again:
                await ask(api)
            error = again.value
            assert error.status_code == 409 and error.code == "idempotency_key_in_use"
            assert error.param == "Idempotency-Key" and "new key" in error.message
            assert error.response.headers["x-should-retry"] == "false"  # the SDK does not retry it
            assert len(backend.calls) == 1 and await requests_of(api, "alice") == 1
            assert await ask(api, idempotency="retry-2") == "A red square."  # a new key is a new request
            assert len(backend.calls) == 2

    asyncio.run(main())


def test_two_users_with_the_same_key_are_both_answered(tmp_path: Path) -> None:
    async def main() -> None:
        backend = ScriptedBackend("A red square.")
        async with running_api(tmp_path, backend) as api:
            bob = await api.new_key("bob", workspace="acme")
            alice_elsewhere = await api.new_key("alice", workspace="other")  # the same name, another workspace
            assert await ask(api) == await ask(api, bob) == await ask(api, alice_elsewhere) == "A red square."
            assert [c["user"] for c in backend.calls] == ["alice", "bob", "alice"]
            assert await requests_of(api, "alice") == await requests_of(api, "bob") == 1

    asyncio.run(main())


@pytest.mark.parametrize("failure", [RequestFailed("the replica died"), Busy("queue full", 3.0)])
def test_a_retry_whose_first_attempt_failed_is_answered(tmp_path: Path, failure: Exception) -> None:
    async def main() -> None:
        backend = ScriptedBackend("A red square.")
        backend.fail = failure
        async with running_api(tmp_path, backend) as api:
            with pytest.raises(openai.APIStatusError) as failed:
                await ask(api)
            assert failed.value.status_code == 503 and "x-should-retry" not in failed.value.response.headers
            backend.fail = None
            assert await ask(api) == "A red square."
            assert await requests_of(api, "alice") == 1  # the failed attempt's charge was given back

    asyncio.run(main())


def test_a_request_without_the_header_is_never_a_duplicate(tmp_path: Path) -> None:
    async def main() -> None:
        backend = ScriptedBackend("A red square.")
        async with running_api(tmp_path, backend) as api:
            chat: Any = api.client().chat.completions
            for _ in range(2):
                await chat.create(model="minigpt4", messages=[user("What is it?", data_url(png()))])
            assert len(backend.calls) == 2

    asyncio.run(main())


def test_a_refused_request_gives_its_key_back_so_that_its_retry_is_answered(tmp_path: Path) -> None:
    """As Stripe keeps no result for a request that failed validation: a 429 (or 403, 400) stores nothing, so the
    same key sent again once the quota allows is answered — once: after that it is a 409 like any answer's."""

    async def main() -> None:
        async with running_api(tmp_path, ScriptedBackend("A red square.")) as api:
            await api.db.set_quota("user", "openai", "acme", "alice", requests_per_day=1)
            assert await ask(api, idempotency="first") == "A red square."
            with pytest.raises(openai.RateLimitError) as refused:
                await ask(api, idempotency="second")
            assert refused.value.response.headers["x-should-retry"] == "false"  # the day's limit: hours away
            await api.db.set_quota("user", "openai", "acme", "alice", requests_per_day=3)
            assert await ask(api, idempotency="second") == "A red square."
            with pytest.raises(openai.ConflictError):
                await ask(api, idempotency="second")
            assert await requests_of(api, "alice") == 2

    asyncio.run(main())
