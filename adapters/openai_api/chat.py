"""An OpenAI chat-completions body as the bot reads it, and the stored thread it continues.

:func:`parse_body` checks the JSON (a :class:`BadRequest` names the ``param`` at fault; unknown fields
are ignored as OpenAI ignores them).  :func:`place` maps a stateless request — each one carries the whole
conversation — onto one stored thread, so history shows one conversation and the engine reuses its
cached picture tokens and KV prefix:

* the thread id is derived from the API key and either ``metadata.conversation_id`` (explicit) or the
  conversation's first user message, pictures included (by SHA-256); several conversations that open
  with the same message get slots ``…``, ``….1`` … ``….7``;
* a slot whose stored turns are exactly the request's earlier messages is continued: only the last user
  message is sent, as a follow-up;
* otherwise (an edited or regenerated conversation, one the bot never saw) a free slot — else the least
  recently used one — starts over with the request's earlier messages as its history
  (:attr:`bot.core.requests.Request.history`).

``system`` and ``developer`` messages are not sent to the model: MiniGPT-4 was trained with its own fixed
system prompt (the variant's conversation template), and clients often put the date or their own persona
there, which would change every request.  They are ignored (documented in docs/openai-api.md).
"""

from __future__ import annotations

import hashlib
import re
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.core.frontend_api import Core, PresetInfo, ThreadTurn
from bot.core.requests import GenerationRequest, ThreadRef

__all__ = ["BadRequest", "ChatCall", "Message", "Placement", "parse_body", "place"]

SLOTS = 8
IGNORED_ROLES = frozenset({"system", "developer"})
UNSUPPORTED_ROLES = frozenset({"tool", "function"})
MAX_MESSAGES = 512
MAX_TEXT = 64 * 1024


class BadRequest(Exception):
    """The body is not a request the API serves: a 400 naming ``param`` (the SDK shows both)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class Message:
    """A user or assistant message: its text parts joined, and its ``image_url`` parts (URLs as given)."""

    role: str
    text: str
    image_urls: list[str] = field(default_factory=list)


@dataclass
class ChatCall:
    model: str
    messages: list[Message]
    stream: bool
    include_usage: bool
    generation: GenerationRequest
    conversation_id: str | None


def _number(body: dict[str, Any], name: str, kind: type | types.UnionType) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be a {'whole ' if kind is int else ''}number.", name)
    return value


def _tagged(items: list[Any], where: str, tag: str, what: str) -> Iterator[tuple[str, dict[str, Any], str]]:
    """Each item of a JSON list with its position (``messages[2]``) and its string ``tag`` (a message's
    ``role``, a content part's ``type``): a 400 naming the position when an item is not such an object."""
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get(tag), str):
            raise BadRequest(f"Each {what} must be an object with a '{tag}'.", at)
        yield at, item, item[tag]


def _text_of(content: Any, where: str, urls: list[str]) -> str:
    """The text of a message's ``content`` (a string, or a list of parts); ``image_url`` parts go to ``urls``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("'content' must be a string or a list of content parts.", where)
    texts = []
    for at, part, kind in _tagged(content, where, "type", "content part"):
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise BadRequest("A text part needs a string 'text'.", f"{at}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise BadRequest("An image_url part needs image_url.url (a data: or http(s) URL).", f"{at}.image_url")
            urls.append(url)
        else:
            raise BadRequest(f"Content parts of type {kind[:40]!r} are not supported: send text and image_url.", at)
    return "\n".join(texts)


def _messages(raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty list.", "messages")
    if len(raw) > MAX_MESSAGES:
        raise BadRequest(f"At most {MAX_MESSAGES} messages per request.", "messages")
    messages = []
    for where, item, role in _tagged(raw, "messages", "role", "message"):
        if role in UNSUPPORTED_ROLES or (role == "assistant" and item.get("tool_calls")):
            raise BadRequest("Tool and function calls are not supported by this model.", where)
        if role not in ("user", "assistant") and role not in IGNORED_ROLES:
            raise BadRequest(f"Unknown role {role[:40]!r}: use system, user or assistant.", f"{where}.role")
        urls: list[str] = []
        text = _text_of(item.get("content"), f"{where}.content", urls)
        if len(text) > MAX_TEXT:
            raise BadRequest(f"A message may have at most {MAX_TEXT} characters.", f"{where}.content")
        if role in IGNORED_ROLES:
            continue
        if role == "assistant" and urls:
            raise BadRequest("Assistant messages cannot carry pictures.", f"{where}.content")
        messages.append(Message(role, text, urls))
    if not messages or messages[-1].role != "user":
        raise BadRequest("The last message must be the user's.", "messages")
    return messages


def _generation(body: dict[str, Any]) -> GenerationRequest:
    tokens = _number(body, "max_completion_tokens", int)
    if tokens is None:
        tokens = _number(body, "max_tokens", int)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of strings.", "stop")
    return GenerationRequest(
        max_new_tokens=tokens,
        temperature=_number(body, "temperature", int | float),
        top_p=_number(body, "top_p", int | float),
        stop=stops,
        seed=_number(body, "seed", int),
    )


def parse_body(body: Any) -> ChatCall:
    """Check a chat-completions body (raises :class:`BadRequest`)."""
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required (see GET /v1/models).", "model")
    n = _number(body, "n", int)
    if n is not None and n != 1:
        raise BadRequest("Only n = 1 is supported: one answer per request.", "n")
    if body.get("tools") or body.get("functions"):
        raise BadRequest("Tools and functions are not supported by this model.", "tools")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise BadRequest("logprobs are not supported.", "logprobs")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise BadRequest("Only the text response format is supported.", "response_format")
    if body.get("audio") is not None or "audio" in (body.get("modalities") or []):
        raise BadRequest("Audio is not supported.", "modalities")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object.", "stream_options")
    include_usage = bool(options and options.get("include_usage") is True)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest("'metadata' must be an object of strings.", "metadata")
    conversation = (metadata or {}).get("conversation_id")
    if conversation is not None and (not isinstance(conversation, str) or not 0 < len(conversation) <= 512):
        raise BadRequest("metadata.conversation_id must be a string of 1 to 512 characters.", "metadata")
    return ChatCall(model, _messages(body.get("messages")), bool(stream), include_usage, _generation(body),
                    conversation)  # fmt: skip


# ----------------------------------------------------------------------------- threads


@dataclass
class Placement:
    """Where a request goes: the thread, and the earlier messages to seed it with (``None``: a follow-up)."""

    ref: ThreadRef
    seed: list[Message] | None


def _canon(text: str) -> str:
    return " ".join(text.split())


class TurnMatcher:
    """Whether a client's copy of a conversation is what a thread stored (see the module docstring)."""

    def __init__(self, presets: Sequence[PresetInfo], default_preset: str) -> None:
        self.prompts = {p.name: _canon(p.prompt) for p in presets if p.prompt}
        self.default = self.prompts.get(default_preset, "")

    def asked(self, stored: str, sent: str, has_image: bool) -> bool:
        """A stored question (preset prompts expanded) against the text a client sends back."""
        stored, sent = _canon(stored), _canon(sent)
        if stored == sent or (not sent and has_image and stored == self.default):
            return True
        words = re.sub(r"^[/!]", "", sent)
        for name, prompt in self.prompts.items():
            if stored == prompt or stored.startswith(prompt + " "):
                rest = stored[len(prompt) :].strip()
                head, _, tail = words.partition(" ")
                if rest == sent or (head.rstrip(".!?:").lower() == name.lower() and rest == tail.strip()):
                    return True
        return False

    def matches(self, turns: Sequence[ThreadTurn], messages: Sequence[Message], digests: dict[str, str]) -> bool:
        """The thread's model-visible turns are exactly ``messages`` (``digests``: image URL → SHA-256)."""
        visible = [t for t in turns if (t.role == "user" and t.status != "retried") or
                   (t.role == "assistant" and t.status == "done" and t.text)]  # fmt: skip
        at = 0
        for message in messages:
            if message.role == "assistant":
                if at >= len(visible) or visible[at].role != "assistant":
                    return False
                stored, sent = _canon(visible[at].text), _canon(message.text)
                if not (sent == stored or sent.startswith(stored + " ")):  # notes may follow the stored answer
                    return False
                at += 1
                continue
            parts = max(1, len(message.image_urls))
            group = visible[at : at + parts]
            if len(group) < parts or any(t.role != "user" for t in group):
                return False
            for turn, url in zip(group, message.image_urls, strict=False):
                want = digests.get(url, "")
                if not turn.has_image or (not want.startswith("url:") and turn.image_sha256 != want):
                    return False
            if not message.image_urls and group[0].has_image:
                return False
            if any(t.text for t in group[:-1]) or not self.asked(
                group[-1].text, message.text, bool(message.image_urls)
            ):
                return False
            at += parts
        return at == len(visible)


def _thread_base(key_id: str, call: ChatCall, digests: dict[str, str]) -> tuple[str, int]:
    if call.conversation_id is not None:
        raw = f"{key_id}\0explicit\0{call.conversation_id}"
        return "c-" + hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()[:40], 1
    first = call.messages[0]
    raw = "\0".join([key_id, _canon(first.text), *(digests.get(u, u) for u in first.image_urls)])
    return "h-" + hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()[:40], SLOTS


async def place(
    core: Core, key_id: str, workspace: str, channel: str, call: ChatCall, digests: dict[str, str]
) -> Placement:
    """The stored thread this request continues, or the one it starts over (see the module docstring)."""
    prior = [m for m in call.messages[:-1] if m.text or m.image_urls]
    base, slots = _thread_base(key_id, call, digests)
    matcher = TurnMatcher(core.presets(workspace, channel), core.default_preset)
    free: ThreadRef | None = None
    oldest: tuple[Any, ThreadRef] | None = None
    for slot in range(slots):
        ref = ThreadRef("openai", workspace, channel, base if slot == 0 else f"{base}.{slot}")
        view = await core.thread(ref, turns=True)
        if not view.live:
            free = free or ref
            continue
        if prior and matcher.matches(view.turns, prior, digests):
            return Placement(ref, None)
        last = max((t.created_at for t in view.turns if t.created_at), default=None)
        if oldest is None or (last is not None and (oldest[0] is None or last < oldest[0])):
            oldest = (last, ref)
    if free is not None:
        return Placement(free, prior or None)
    assert oldest is not None
    return Placement(oldest[1], prior)  # the least recently used slot starts over (its conversation is archived)
