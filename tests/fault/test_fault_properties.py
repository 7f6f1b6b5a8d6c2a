"""Property tests of the text cleaning (hypothesis): any string in — controls, NUL, CRLF, lone and paired
surrogates, mass mentions, split anywhere into tokens — valid text out, for both databases and for
Slack and Discord payloads.
"""

from __future__ import annotations

import asyncio
import json
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapters.slack.messages import escape_mrkdwn
from bot.core.config import Settings
from bot.core.requests import Delta, Final, ImageAttachment, Request, ThreadRef
from bot.core.sanitize import StreamSanitizer, clean_text, sanitize_output
from bot.core.service import BotService
from storage import Database
from tests.pictures import png
from tests.scripted_backend import ScriptedBackend

# Every code point (surrogates included), plus the pieces that matter, so they turn up often.
SNIPPETS = ["\x00", "\r", "\n", "\r\n", "\t", "\x1b", "\x7f", "\ud83d", "\ude00", "\ud83d\ude00", "@", "<", ">",
            "!", "|", "&", "^", "@everyone", "@HERE", "@channel", "<!here>", "<!channel|x>", "<!subteam^S1|team>",
            "<@&123>", "<!", "<@&", "every", "one", "here", "subteam^"]  # fmt: skip
ANY_TEXT = st.lists(st.one_of(st.characters(exclude_categories=()), st.sampled_from(SNIPPETS)), max_size=40).map(
    "".join
)
TOKENS = st.lists(ANY_TEXT, max_size=12)

FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")
# What pages a whole channel: Slack's special mentions, Discord's @everyone/@here (anywhere) and role pings.
MASS_MENTION = re.compile(
    r"@(everyone|here|channel)|<!(everyone|here|channel)(\|[^>]*)?>|<!subteam\^[^>]*>|<@&\d+>", re.IGNORECASE
)


def valid(text: str) -> bool:
    """Storable in PostgreSQL and SQLite, and sendable in any JSON payload: UTF-8, no controls but \\t \\n."""
    text.encode("utf-8")  # raises on a surrogate
    return not FORBIDDEN.search(text)


def payloads(text: str) -> list[bytes]:
    """The JSON bodies a front end would send: Slack ``chat.postMessage``/``chat.update``, a Discord message."""
    slack = {"channel": "C1", "text": escape_mrkdwn(text), "blocks": [{"type": "section", "text": {
        "type": "mrkdwn", "text": escape_mrkdwn(text)}}]}  # fmt: skip
    discord = {"content": text, "allowed_mentions": {"parse": ["users"]}}
    return [json.dumps(body, ensure_ascii=False).encode("utf-8") for body in (slack, discord)]


@given(ANY_TEXT)
@settings(max_examples=500, deadline=None)
def test_fault_clean_text_makes_any_string_valid_text(text: str) -> None:
    cleaned = clean_text(text)
    assert valid(cleaned)
    assert clean_text(cleaned) == cleaned  # idempotent: cleaning at every layer changes nothing further
    assert len(cleaned) <= len(text)  # never longer: a column that fitted still fits
    if not FORBIDDEN.search(text) and "\r" not in text:
        assert cleaned == text  # clean text is left alone
    for body in payloads(cleaned):
        assert json.loads(body)


@given(ANY_TEXT)
@settings(max_examples=500, deadline=None)
def test_fault_sanitized_output_is_valid_and_pages_nobody(text: str) -> None:
    out = sanitize_output(text)
    assert valid(out) and not MASS_MENTION.search(out)
    assert sanitize_output(out) == out
    for body in payloads(out):
        assert json.loads(body) and not MASS_MENTION.search(body.decode("utf-8"))


@given(TOKENS)
@settings(max_examples=500, deadline=None)
def test_fault_streamed_output_is_safe_at_every_point(tokens: list[str]) -> None:
    """However the model's text is split into tokens, every prefix a platform shows while it streams is
    valid and pages nobody, and the deltas add up to the sanitized answer."""
    stream = StreamSanitizer()
    shown = ""
    for token in tokens:
        shown += stream.feed(token)
        assert valid(shown) and not MASS_MENTION.search(shown), (tokens, shown)
    shown += stream.flush()
    assert shown == sanitize_output("".join(tokens))


def _png() -> bytes:
    return png((10, 120, 200), (24, 16))


IDS = st.lists(st.one_of(st.characters(exclude_categories=()), st.sampled_from(["\x00", "\ud800", "\r\n"])),
               max_size=24).map("".join)  # fmt: skip


def test_fault_any_text_is_stored_and_answered_on_both_databases(db_url: str) -> None:
    """The whole core, end to end: any question, ids and model output are answered, stored and read back
    clean — on SQLite and on PostgreSQL."""
    picture = _png()

    async def setup() -> tuple[Database, BotService, ScriptedBackend]:
        db = Database(db_url)
        backend = ScriptedBackend()
        unlimited = Settings.model_validate({"quotas": {"user": {"requests_per_day": 0, "images_per_day": 0}}})
        return db, BotService(unlimited, db, backend), backend

    loop = asyncio.new_event_loop()
    db, service, backend = loop.run_until_complete(setup())
    threads = iter(range(10**6))

    @given(question=ANY_TEXT, answer=TOKENS, user=IDS, channel=IDS, filename=IDS)
    # Ids a random run found where a control character met whitespace collapsing (one normaliser since).
    @example(question="", answer=["a"], user="u", channel="0\x1f0", filename="p")
    @example(question="", answer=["a"], user="\x08", channel="\x08", filename="\x08")
    @example(question="", answer=["a"], user="\ud800", channel="\r\n\x1c", filename="")
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def check(question: str, answer: list[str], user: str, channel: str, filename: str) -> None:
        backend.script = [answer]
        thread = f"t{next(threads)}"  # a new thread each time: the picture starts the conversation
        request = Request("web", "W", channel, thread, user, "q " + question,
                          (ImageAttachment(picture, filename=filename),))  # fmt: skip
        events = loop.run_until_complete(_collect(service.handle(request)))
        final = events[-1]
        assert isinstance(final, Final) and final.kind == "answer", final
        text = sanitize_output("".join(answer)).strip()
        assert final.text == (text or "(no answer)")
        assert "".join(e.text for e in events if isinstance(e, Delta)).strip() == text
        for event in events:
            assert valid(event.text) and not MASS_MENTION.search(event.text)
        ref = ThreadRef("web", "W", channel, thread)  # spelt as the front end got it: the ref normalises it too
        view = loop.run_until_complete(service.thread(ref, turns=True))
        assert [t.text for t in view.turns] == [clean_text("q " + question).strip(), text]
        assert [t.status for t in view.turns] == ["done", "done"]

    try:
        check()
    finally:
        loop.run_until_complete(db.dispose())
        loop.close()


async def _collect(replies) -> list:
    return [event async for event in replies]
