"""The backend contract suite: what every generation backend (local, Ray, vLLM, the next one) must do, as the
core relies on it (``model/engine/contract.py``, ``bot/core/backend_api.py``).

Like transformers' ``ModelTesterMixin``: a backend's test module defines a class deriving from
:class:`BackendContract` with a ``driver`` fixture handing out a :class:`BackendDriver` over the backend
that module already runs — the Ray tests' module-scoped ``cluster``, the vLLM tests' module-scoped ``env`` —
so no backend is started twice.  Each check runs once per backend:

- a stream is token events, then exactly one final event whose text is theirs;
- ``aclose()`` mid-stream frees the request's slot: the backend goes idle and answers the next request;
- out-of-range or unknown options are a :class:`RequestRejected` with reason ``"invalid"`` naming the option;
- a picture that does not decode is a :class:`RequestRejected` with reason ``"image"`` and its index.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from model.engine.contract import FinalEvent, RequestRejected, TokenEvent
from model.image_processing import builtin_test_image
from tests.pictures import encode_png

__all__ = ["BackendContract", "BackendDriver"]

T = TypeVar("T")
PICTURE = encode_png(builtin_test_image(224))
FIRST: list[dict[str, Any]] = [{"role": "user", "text": "What is this?", "image": True}]
SHORT = {"do_sample": False, "max_new_tokens": 8, "repetition_penalty": 1.0}
LONG = {"do_sample": False, "max_new_tokens": 400, "min_length": 401, "max_length": 1000}


@dataclass
class BackendDriver:
    """A started backend, how to run a coroutine where it lives, and how to tell it holds no request."""

    backend: Any
    run: Callable[[Awaitable[Any]], Any]
    idle: Callable[[], Awaitable[bool]]


async def drain(backend: Any, conversation: str, *, turns: list[dict[str, Any]] = FIRST,
                images: list[bytes] | None = None, options: dict[str, Any] = SHORT) -> list[Any]:  # fmt: skip
    stream = backend.stream(turns=turns, images=[PICTURE] if images is None else images,
                            conversation_id=conversation, user=conversation, options=options)  # fmt: skip
    return [event async for event in stream]


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "the backend still holds the closed request"
        await asyncio.sleep(0.1)


class BackendContract:
    """Derive a test class from this and give it a ``driver`` fixture returning a :class:`BackendDriver`."""

    def test_contract_a_stream_is_tokens_then_exactly_one_final(self, driver: BackendDriver) -> None:
        events = driver.run(drain(driver.backend, "contract-stream"))
        tokens, final = events[:-1], events[-1]
        assert all(type(e) is TokenEvent for e in tokens) and type(final) is FinalEvent
        assert final.finish_reason in {"length", "eos", "stop"} and final.completion_tokens == len(tokens) >= 1
        assert "".join(t.text for t in tokens) == final.text

    def test_contract_aclose_mid_stream_frees_the_slot(self, driver: BackendDriver) -> None:
        async def leave_then_ask() -> list[Any]:
            stream = driver.backend.stream(turns=FIRST, images=[PICTURE], conversation_id="contract-leave",
                                           user="contract-leave", options=LONG)  # fmt: skip
            for _ in range(3):
                assert isinstance(await anext(stream), TokenEvent)
            await stream.aclose()  # the user left: the front end closes the reply
            await wait_until(driver.idle)
            return await drain(driver.backend, "contract-after")

        after = driver.run(leave_then_ask())
        assert type(after[-1]) is FinalEvent  # the slot was free for the next request

    def test_contract_invalid_options_are_rejected_as_invalid(self, driver: BackendDriver) -> None:
        async def main() -> list[RequestRejected]:
            errors = []
            for options in ({**SHORT, "temperature": 0.0}, {**SHORT, "bogus": 1}):
                with pytest.raises(RequestRejected) as info:
                    await drain(driver.backend, "contract-invalid", options=options)
                errors.append(info.value)
            return errors

        bad_value, unknown = driver.run(main())
        assert bad_value.reason == unknown.reason == "invalid"
        assert "temperature" in bad_value.detail and "bogus" in unknown.detail

    def test_contract_an_undecodable_picture_is_rejected_with_its_index(self, driver: BackendDriver) -> None:
        turns = [*FIRST, {"role": "assistant", "text": "A picture."}, {"role": "user", "text": "And?", "image": True}]

        async def main() -> RequestRejected:
            with pytest.raises(RequestRejected) as info:
                await drain(driver.backend, "contract-picture", turns=turns, images=[PICTURE, b"not a picture"])
            return info.value

        error = driver.run(main())
        assert (error.reason, error.image_index) == ("image", 1)
