"""Helpers shared by the engine tests (the model fixtures come from tests/conftest.py).

Imported by the test modules as ``engine_helpers`` (pytest puts this folder on ``sys.path``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from model.engine import EngineRequest, FinalEvent, RequestStream, TokenEvent
from model.engine.caches import Item, image_key
from model.generate import default_options, generate
from model.image_processing import builtin_test_image, load_image
from tests.pictures import encode_png

WAIT = 20.0  # generous bound on anything that should end; a hang fails instead of blocking the suite


PICTURE = encode_png(builtin_test_image(224))
OTHER = encode_png(Image.new("RGB", (96, 64), (20, 120, 200)))  # a second, different picture


def greedy(m: Any, n: int, **extra: Any) -> Any:
    """Greedy options for at most ``n`` new tokens (no repetition penalty: ids match ``model.generate``)."""
    return default_options(m, do_sample=False, max_new_tokens=n, repetition_penalty=1.0, **extra)


def endless(m: Any, n: int = 1500) -> Any:
    """Greedy options that only the token budget can end: EOS is masked and no stop strings apply."""
    return greedy(m, n, min_length=n + 1, max_length=n + 1000, stop_strings=())


def ask(m: Any, text: str, options: Any, image: bytes | None = PICTURE, **kw: Any) -> EngineRequest:
    """A one-turn request, with ``image`` attached unless it is None."""
    images = [image] if image is not None else []
    return EngineRequest(turns=[user(text, image=image is not None)], images=images, options=options, **kw)


async def bounded(awaitable: Any, timeout: float = WAIT) -> Any:
    """Await with a generous bound (:data:`WAIT`): a hang fails the test instead of blocking the suite."""
    return await asyncio.wait_for(awaitable, timeout)


def user(text: str, image: bool = True) -> dict[str, Any]:
    return {"role": "user", "text": text, "image": image}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "text": text}


_ENCODED: dict[tuple[int, bytes], torch.Tensor] = {}


def encode(m: Any, image: bytes) -> torch.Tensor:
    """Visual tokens of one image (memoised per model: the tests reuse a few images)."""
    key = (id(m), image)
    if key not in _ENCODED:
        _ENCODED[key] = m.encode_pil([load_image(image)])[0]
    return _ENCODED[key]


def context_for(m: Any, turns: list[dict[str, Any]], images: list[bytes]) -> torch.Tensor:
    """The full context embeddings a lone request builds (no engine involved)."""
    tokens = [encode(m, b) for b in images]
    return m.context_embeddings(m.build_prompt(turns), tokens)


def items_for(m: Any, turns: list[dict[str, Any]], images: list[bytes]) -> list[Item]:
    """What each context position holds, as the runner describes it (text ids / image token slots)."""
    segments = m.segment_token_ids(m.build_prompt(turns))
    items: list[Item] = []
    for i, ids in enumerate(segments):
        items.extend(ids)
        if i < len(images):
            items.extend(("img", image_key(images[i]), j) for j in range(m.spec.num_visual_tokens))
    return items


def alone_ids(m: Any, turns: list[dict[str, Any]], images: list[bytes], options: Any) -> list[int]:
    """Greedy ids of the same request run on its own through ``model.generate``."""
    return generate(m, [context_for(m, turns, images)], options)[0].token_ids


async def collect(stream: RequestStream, events: list[Any] | None = None) -> tuple[list[TokenEvent], FinalEvent]:
    """Consume a stream; checks the event protocol (indices 0, 1, … then exactly one final event)."""
    events = [] if events is None else events
    async for event in stream:
        events.append(event)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    finals = [e for e in events if isinstance(e, FinalEvent)]
    assert len(finals) == 1 and events[-1] is finals[0], events
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert tuple(t.token_id for t in tokens) == finals[0].token_ids
    assert all(t.request_id == stream.request_id for t in events)
    return tokens, finals[0]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.005)
    return predicate()
