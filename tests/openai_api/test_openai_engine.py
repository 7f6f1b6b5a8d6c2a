"""Through the local engine on tiny demo weights: a follow-up sent with the whole conversation continues the
stored thread, so the engine reuses the picture tokens and KV prefix (``cached_tokens``); an edited one is a
fresh prefill."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from openai_helpers import assistant, data_url, png, running_api, user

from model.engine.local_backend import EngineBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "web"))
from web_helpers import start_demo_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    running = start_demo_engine(tmp_path_factory.mktemp("openai-demo"))
    yield running
    running.stop()


def test_a_follow_up_hits_the_kv_prefix_and_an_edit_does_not(engine: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with running_api(tmp_path, EngineBackend(engine, info={"demo": True})) as api:
            chat = api.client().chat.completions
            opening = user("What is in the picture?", data_url(png()))
            first = await chat.create(model="minigpt4", messages=[opening])
            assert first.usage.prompt_tokens > 32 and first.usage.prompt_tokens_details.cached_tokens == 0
            answer = first.choices[0].message.content
            stream = await chat.create(model="minigpt4", messages=[opening, assistant(answer), user("Why?")],
                                       stream=True, stream_options={"include_usage": True})  # fmt: skip
            chunks = [c async for c in stream]
            usage = chunks[-1].usage
            assert usage.prompt_tokens > first.usage.prompt_tokens
            # everything up to the new question came from the cache: the picture and the first exchange
            assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1  # as the engine tests
            edited = await chat.create(model="minigpt4", messages=[opening, assistant("Something else."), user("Why?")])
            assert edited.usage.prompt_tokens_details.cached_tokens == 0
            assert len(await api.db.list_conversations(platform="openai")) == 2

    asyncio.run(main())
