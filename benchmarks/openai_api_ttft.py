"""Follow-up TTFT through the OpenAI-compatible API: a follow-up that continues the stored thread (the engine
reuses the picture tokens and KV prefix) against the same question asked as a fresh thread (the same history,
edited so it cannot match: a full prefill), with the real ``openai`` client over loopback.

    .venv/bin/python benchmarks/openai_api_ttft.py [--rounds 5] [--turns 3]

Runs on tiny demo weights by default (CPU, seconds): the numbers show the mechanism, not real-model
latency.  TTFT is measured at the client: from sending the request to the first content chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "openai_api"), str(ROOT / "tests" / "web")]

from openai_helpers import assistant, data_url, png, running_api, user  # noqa: E402
from web_helpers import start_demo_engine  # noqa: E402

from model.engine.local_backend import EngineBackend  # noqa: E402


async def ttft(chat: object, messages: list[dict]) -> tuple[float, str, int]:
    started = time.perf_counter()
    first, text, cached = None, "", 0
    stream = await chat.create(model="minigpt4", messages=messages, stream=True,  # type: ignore[attr-defined]
                               stream_options={"include_usage": True})  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return first or 0.0, text, cached


async def main(rounds: int, turns: int, folder: Path) -> None:
    engine = start_demo_engine(folder)
    try:
        async with running_api(folder, EngineBackend(engine, info={"demo": True}),
                               settings={"generation": {"max_new_tokens": 8}}) as api:  # fmt: skip
            chat = api.client().chat.completions
            follow, fresh = [], []
            for r in range(rounds):
                messages = [user(f"Round {r}: what is in the picture?", data_url(png((r * 20 % 255, 80, 40))))]
                for t in range(turns):
                    _ttft, answer, _cached = await ttft(chat, messages)
                    messages += [assistant(answer), user(f"Tell me more, part {t}.")]
                took, _answer, cached = await ttft(chat, messages)  # continues the stored thread
                follow.append((took, cached))
                edited = [messages[0], assistant("(edited) " + messages[1]["content"]), *messages[2:]]
                took, _answer, cached = await ttft(chat, edited)  # same length, nothing to reuse
                fresh.append((took, cached))
            for name, rows in (("follow-up (stored thread)", follow), ("fresh thread (seeded)", fresh)):
                times = [t * 1000 for t, _c in rows]
                print(
                    f"{name:28s} TTFT median {statistics.median(times):7.1f} ms  "
                    f"min {min(times):7.1f} ms  cached prompt tokens {statistics.median(c for _t, c in rows):.0f}"
                )
    finally:
        engine.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(args.rounds, args.turns, Path(tmp)))
