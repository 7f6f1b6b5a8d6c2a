"""A fuzz pass over the chat-completions JSON body: whatever the client sends, the API answers with a 4xx
in OpenAI's error shape or a 200 — never a 5xx — and keeps serving (hypothesis, against the running server)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_helpers import Api, data_url, png, running_api

from tests.scripted_backend import ScriptedBackend

PICTURE = data_url(png(size=(8, 8)))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
odd = json_values | st.sampled_from([PICTURE, "data:image/png;base64,@@@", "data:,", "minigpt4", "user", -1, 2**70])
part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", 3])},
    optional={"text": odd, "image_url": st.one_of(odd, st.fixed_dictionaries({"url": odd}))},
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "x", None])},
    optional={"content": st.one_of(odd, st.lists(part, max_size=3)), "tool_calls": odd},
)
body = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["minigpt4", "minigpt4:recipe", "gpt-4", ""]) | odd,
    "messages": st.lists(message, max_size=4) | odd, "stream": odd, "stream_options": odd,
    "max_tokens": odd, "max_completion_tokens": odd, "temperature": odd, "top_p": odd, "stop": odd, "seed": odd,
    "n": odd, "metadata": odd, "tools": odd, "response_format": odd, "logprobs": odd, "user": odd,
})  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, asyncio.AbstractEventLoop]]:
    """The API on an event loop in a background thread, for the synchronous hypothesis test."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    context = running_api(tmp_path_factory.mktemp("fuzz"), ScriptedBackend("ok"))
    api = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop).result(30)
    session = asyncio.run_coroutine_threadsafe(_session(), loop).result(30)
    api.session = session  # type: ignore[attr-defined]
    try:
        yield api, loop
    finally:
        asyncio.run_coroutine_threadsafe(session.close(), loop).result(30)
        asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


async def _post(api: Any, raw: bytes) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {api.key}", "Content-Type": "application/json"}
    async with api.session.post(f"{api.url}/chat/completions", data=raw, headers=headers) as response:
        return response.status, await response.text()


def _check(served: tuple[Api, asyncio.AbstractEventLoop], raw: bytes) -> None:
    api, loop = served
    status, text = asyncio.run_coroutine_threadsafe(_post(api, raw), loop).result(30)
    assert status < 500, (status, raw[:300], text[:300])
    if status != 200:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body)
def test_no_json_body_gets_a_5xx(served: tuple[Api, asyncio.AbstractEventLoop], value: dict[str, Any]) -> None:
    _check(served, json.dumps(value).encode())


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"model": "minigpt4", "messages": ' +
                                 b"[" * 5000 + b"]" * 5000 + b"}", b'"x"', b"1e999999"])  # fmt: skip
def test_broken_json_is_a_400(served: tuple[Api, asyncio.AbstractEventLoop], raw: bytes) -> None:
    _check(served, raw)


def test_the_server_still_answers_after_the_fuzz(served: tuple[Api, asyncio.AbstractEventLoop]) -> None:
    good = {"model": "minigpt4", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": PICTURE}}]}]}  # fmt: skip
    api, loop = served
    status, text = asyncio.run_coroutine_threadsafe(_post(api, json.dumps(good).encode()), loop).result(30)
    assert status == 200 and json.loads(text)["choices"][0]["message"]["content"] == "ok"
