"""The engine's contract with its callers, torch-free: the events a request streams and the errors it raises.

Both sides import this one module: the engine (and any other generation backend — Ray Serve, vLLM)
produces these types, and the bot core consumes them by type (``isinstance``), never by probing
attributes.  It imports nothing heavy (no torch, PIL or transformers), so the core stays light, and it
carries **no user-facing text**: errors describe what happened (``reason``, ``retry_after_s``,
``image_index``); the core decides what a person is told.

A request streams zero or more :class:`TokenEvent` and ends with exactly one :class:`FinalEvent`,
unless it raises one of the :class:`EngineError` subclasses.  Token events may come in one burst
just before the final event when the decoding cannot stream (the local engine's beam search: the
best beam is known only at the end); :attr:`FinalEvent.text` is the answer either way.

======================  ==========================================================  ===================
error                   meaning                                                     whose fault
======================  ==========================================================  ===================
:class:`Busy`           too loaded right now; ``retry_after_s`` is a best guess      nobody: try later
:class:`RequestRejected` this request can never be served as given (an unreadable    the input
                        picture, a thread too long for the context)
:class:`RequestFailed`  the backend broke while serving it (a step crashed, a        the backend
                        replica died); other requests are unaffected
======================  ==========================================================  ===================
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict, TypeVar

__all__ = [
    "Busy",
    "ChatTurn",
    "EngineError",
    "FinalEvent",
    "FinishReason",
    "RequestFailed",
    "RequestRejected",
    "RequestTooLarge",
    "StreamArgs",
    "TokenEvent",
    "stream_method",
]

FinishReason = Literal["eos", "stop", "length", "aborted", "deadline"]


class ChatTurn(TypedDict):
    """One turn of a thread as the backend receives it; ``image`` marks a user turn that carries a picture."""

    role: Literal["user", "assistant"]
    text: str
    image: NotRequired[bool]


class StreamArgs(TypedDict):
    """The keyword arguments of every backend's ``stream``: the seam's request defined once, so the protocol
    (``bot.core.backend_api``) and the local, Ray and vLLM backends cannot drift apart (:func:`stream_method`).

    ``conversation_id`` keys cached image tokens and KV prefixes (and replica affinity); ``user`` is the
    fairness key; ``options`` are the ``[generation]`` settings.
    """

    turns: Sequence[ChatTurn]
    images: Sequence[bytes]
    conversation_id: str
    user: str
    options: Mapping[str, Any]


_E = TypeVar("_E")


def stream_method(method: Callable[[Any, StreamArgs], AsyncIterator[_E]]) -> Callable[..., AsyncIterator[_E]]:
    """A backend's ``stream`` written against :class:`StreamArgs` (``@stream_method async def stream(self, args:
    StreamArgs)``) without restating the parameters.  Callers keep the seam's call, keyword-only and exactly
    these keywords (a misspelt one is a ``TypeError``, as ``inspect.signature`` shows); the method's own
    iterator is returned as it is, so ``aclose`` reaches it."""

    def stream(
        self: Any,
        *,
        turns: Sequence[ChatTurn],
        images: Sequence[bytes],
        conversation_id: str,
        user: str,
        options: Mapping[str, Any],
    ) -> AsyncIterator[_E]:
        args = StreamArgs(turns=turns, images=images, conversation_id=conversation_id, user=user, options=options)
        return method(self, args)

    stream.__name__, stream.__qualname__, stream.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return stream


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it made visible (may be empty while a character is incomplete)."""

    request_id: str
    index: int
    token_id: int
    text: str


@dataclass(frozen=True)
class FinalEvent:
    """Last event of every request: why it ended, the cleaned answer, counts and timings."""

    request_id: str
    finish_reason: FinishReason
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    reused_prefix_tokens: int
    queued_s: float
    ttft_s: float | None
    total_s: float


class EngineError(Exception):
    """Base of everything a backend raises for one request (``str(exc)`` is for logs, not for users)."""


class Busy(EngineError):
    """Too loaded to take this request now; ``retry_after_s`` is a best guess of when it would be taken."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(f"busy: {reason} (retry in about {retry_after_s:.0f} s)")
        self.reason = reason
        self.retry_after_s = retry_after_s


class RequestRejected(EngineError):
    """This request cannot be served as given; sending it again will not help.

    ``reason`` is ``"image"`` (picture ``image_index``, 0-based, cannot be decoded), ``"too_large"``
    (the thread plus the answer cannot fit the context or the KV budget) or ``"invalid"`` (anything
    else wrong with the request, e.g. a placeholder/picture count mismatch).
    """

    def __init__(
        self,
        reason: Literal["image", "too_large", "invalid"],
        detail: str,
        *,
        image_index: int | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.image_index = image_index


class RequestTooLarge(RequestRejected, ValueError):
    """The request can never fit the KV budget (context + ``max_new_tokens``)."""

    def __init__(self, detail: str) -> None:
        super().__init__("too_large", detail)


class RequestFailed(EngineError):
    """The backend failed while serving this request (not the input's fault); other requests go on."""
