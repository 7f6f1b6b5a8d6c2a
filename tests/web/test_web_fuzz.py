"""Malformed requests to ``POST /api/messages`` never get a 5xx, and the server keeps answering (issue 16).

Real HTTP over loopback against the real web app (``run_web``) and a real ``BotService`` on SQLite; the
model is the scripted backend (no torch work).  Bodies are written byte by byte on a raw socket, so
nothing on the client side repairs them: hand-picked cases (each one a 500 once) and a bounded set of
random mutations of a valid message (truncated, wrong boundaries, huge field names, non-UTF-8 text,
missing and doubled parts, broken chunked framing), from a fixed seed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from pathlib import Path

import pytest

from adapters.web import run_web
from bot.core.config import Settings
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.pictures import png
from tests.scripted_backend import ScriptedBackend

# adapters.web silences these at import (it refuses unnamed parts itself); pytest resets warning filters per test.
pytestmark = [
    pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader"),
    pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionParam"),
]

SEED = 20260616
RANDOM_CASES = 160
CASE_TIMEOUT_S = 5.0
CHUNKED_GRACE_S = 1.0  # how long a chunked request may wait for its answer before the client hangs up
TOTAL_BUDGET_S = 90.0
B = "fuzzBoundary42"
MULTIPART = f"multipart/form-data; boundary={B}"


def _png() -> bytes:
    return png((200, 40, 0), (16, 12))


PNG = _png()


def _part(name: bytes, value: bytes, extra: bytes = b"", boundary: str = B) -> bytes:
    return b"--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n%s\r\n%s\r\n" % (
        boundary.encode(), name, extra, value
    )  # fmt: skip


def _valid_parts(thread: str = "fuzz") -> list[bytes]:
    return [
        _part(b"thread", thread.encode()),
        _part(b"text", "What is this? ünïcode".encode()),
        _part(b"user", b"fuzzer"),
        _part(b'image"; filename="p.png', PNG, b"Content-Type: image/png\r\n"),
    ]


def _body(parts: list[bytes], boundary: str = B) -> bytes:
    return b"".join(parts) + b"--%s--\r\n" % boundary.encode()


# (label, content type, body, extra request headers): hand-picked; several were a 500 or a traceback before.
FIXED: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("issue 16: no headers in the part", "multipart/form-data; boundary=zz", b"--zz\r\nfoo\r\n", {}),
    ("only the first boundary", "multipart/form-data; boundary=zz", b"--zz\r\n", {}),
    ("empty body", MULTIPART, b"", {}),
    ("no boundary parameter", "multipart/form-data", b"--zz\r\n\r\n", {}),
    ("empty boundary parameter", "multipart/form-data; boundary=", b"--\r\n", {}),
    ("boundary over 70 chars", "multipart/form-data; boundary=" + "b" * 80, b"--" + b"b" * 80 + b"--\r\n", {}),
    ("huge field name", MULTIPART, _body([_part(b"x" * 100_000, b"v")]), {}),
    ("huge header line", MULTIPART, b"--%s\r\nX-" % B.encode() + b"y" * 70_000 + b": 1\r\n\r\nv\r\n", {}),
    ("too many part headers", MULTIPART, b"--%s\r\n" % B.encode() + b"X-A: b\r\n" * 200 + b"\r\nv\r\n", {}),
    (
        "header without a colon",
        MULTIPART,
        b"--%s\r\nno colon here\r\n\r\nv\r\n--%s--\r\n" % (B.encode(), B.encode()),
        {},
    ),
    ("non-UTF-8 thread", MULTIPART, _body([_part(b"thread", b"ab\xff\xfe")]), {}),
    ("non-UTF-8 text", MULTIPART, _body([_part(b"thread", b"t-latin"), _part(b"text", b"caf\xe9 \xff")]), {}),
    (
        "unknown part charset",
        MULTIPART,
        _body([_part(b"thread", b"t1", b"Content-Type: text/plain; charset=no-such-charset\r\n")]),
        {},
    ),
    ("_charset_ field too long", MULTIPART, _body([_part(b"_charset_", b"u" * 40), _part(b"thread", b"t1")]), {}),
    ("_charset_ field unknown", MULTIPART, _body([_part(b"_charset_", b"klingon"), _part(b"thread", b"t1")]), {}),
    ("_charset_ field not ASCII", MULTIPART, _body([_part(b"_charset_", b"\xff\xfe"), _part(b"thread", b"t1")]), {}),
    (
        "bad RFC 2231 name",
        MULTIPART,
        b"--%s\r\nContent-Disposition: form-data; name*=UTF-8''%%FF%%FE\r\n\r\nv\r\n--%s--\r\n"
        % (B.encode(), B.encode()),
        {},
    ),
    (
        "non-ASCII disposition",
        MULTIPART,
        b"--%s\r\nContent-Disposition: \xff\xfe\r\n\r\nv\r\n--%s--\r\n" % (B.encode(), B.encode()),
        {},
    ),
    ("part without disposition", MULTIPART, b"--%s\r\nX-A: b\r\n\r\nv\r\n--%s--\r\n" % (B.encode(), B.encode()), {}),
    (
        "nested multipart",
        MULTIPART,
        b"--%s\r\nContent-Type: multipart/mixed; boundary=yy\r\n\r\n--yy\r\nfoo\r\n" % B.encode(),
        {},
    ),
    (
        "nested multipart without boundary",
        MULTIPART,
        b"--%s\r\nContent-Type: multipart/mixed\r\n\r\n--yy\r\n--%s--\r\n" % (B.encode(), B.encode()),
        {},
    ),
    ("bad part Content-Length", MULTIPART, _body([_part(b"thread", b"t1", b"Content-Length: -1\r\n")]), {}),
    ("wrong boundary in body", MULTIPART, _body(_valid_parts(), boundary="other"), {}),
    ("boundary not ASCII", "multipart/form-data; boundary=\u00e9\u00e9", b"--\xc3\xa9\xc3\xa9--\r\n", {}),
    ("urlencoded, unknown charset", "application/x-www-form-urlencoded; charset=bogus", b"thread=abc", {}),
    ("urlencoded, non-UTF-8", "application/x-www-form-urlencoded", b"thread=t1&text=caf\xe9", {}),
    ("urlencoded, bad escapes", "application/x-www-form-urlencoded", b"%zz=%&thread=%", {}),
    ("no content type", "", b"thread=t1", {}),
    ("truncated mid-part", MULTIPART, _body(_valid_parts())[:150], {}),
    ("no closing boundary", MULTIPART, b"".join(_valid_parts()), {}),
    ("bad chunk size", MULTIPART, b"zz\r\n--\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}),
]


def _mutate(rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
    """A valid message with one to three random mutations."""
    parts = _valid_parts(f"r{rng.randrange(10**6)}")
    ctype, headers, labels = MULTIPART, {}, []
    chunked = False
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["drop", "double", "name", "utf8", "ctype", "boundary", "headers", "charset", "chunked"])
        labels.append(kind)
        if kind == "drop" and parts:
            parts.pop(rng.randrange(len(parts)))
        elif kind == "double" and parts:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(parts))
        elif kind == "name":
            size = rng.choice([1, 200, 5_000, 9_000, 70_000])
            parts.append(_part(bytes(rng.choice(b'abcXYZ_-"; =') for _ in range(size)), b"v"))
        elif kind == "utf8":
            noise = bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 20)))
            parts.append(_part(rng.choice([b"text", b"thread", b"user", b"preset", b"event_id"]), b"x" + noise))
        elif kind == "ctype":
            ctype = rng.choice(
                ["multipart/form-data", "multipart/form-data; boundary=other", "multipart/mixed; boundary=" + B,
                 "multipart/form-data; boundary=" + B + "; charset=bogus", "multipart/form-data; boundary=\"" + B,
                 "multipart/", "text/plain", "application/x-www-form-urlencoded"]
            )  # fmt: skip
        elif kind == "boundary" and parts:
            i = rng.randrange(len(parts))
            parts[i] = parts[i].replace(B.encode(), rng.choice([b"", b"x", B.encode()[:-1], B.encode() + b"--"]), 1)
        elif kind == "headers" and parts:
            i = rng.randrange(len(parts))
            extra = rng.choice(
                [b"Content-Length: 99999\r\n", b"Content-Transfer-Encoding: base64\r\n", b"Content-Encoding: gzip\r\n",
                 b"Content-Type: multipart/mixed\r\n", b"Content-Type: text/plain; charset=\xff\r\n", b": \r\n",
                 b"X" * 9000 + b": y\r\n", b"Content-Disposition: attachment\r\n"]
            )  # fmt: skip
            parts[i] = parts[i].replace(b"\r\n", b"\r\n" + extra, 1)
        elif kind == "charset":
            parts.insert(0, _part(b"_charset_", rng.choice([b"latin-1", b"utf-16", b"bogus", b"\xff", b"a" * 40])))
        elif kind == "chunked":
            chunked = True
    body = _body(parts)
    kind = rng.choice(["keep", "keep", "truncate", "garbage", "slice"])
    if kind == "truncate":
        body = body[: rng.randrange(len(body) + 1)]
    elif kind == "garbage":
        at = rng.randrange(len(body) + 1)
        body = body[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + body[at:]
    elif kind == "slice" and body:
        at = rng.randrange(len(body))
        body = body[:at] + body[at + rng.randint(1, 200) :]
    labels.append(kind)
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
        body = _chunk(body, rng)
    return "+".join(labels), ctype, body, headers


def _chunk(body: bytes, rng: random.Random) -> bytes:
    """``body`` in chunked transfer encoding, sometimes with a lying chunk size or no last chunk."""
    out, i = [], 0
    while i < len(body):
        n = rng.randint(1, 4096)
        piece = body[i : i + n]
        size = len(piece) + (rng.choice([-3, 5]) if rng.random() < 0.05 else 0)
        out.append(b"%x\r\n%s\r\n" % (max(size, 0), piece))
        i += n
    if rng.random() < 0.9:
        out.append(b"0\r\n\r\n")
    return b"".join(out)


async def _send(
    port: int, ctype: str, body: bytes, headers: dict[str, str]
) -> tuple[int | None, dict[str, str], bytes]:
    """One request on a fresh connection; (status or None when the server closed without answering, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = ["POST /api/messages HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    if "Transfer-Encoding" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    reading: asyncio.Task[bytes] | None = None
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body)
        await writer.drain()
        reading = asyncio.ensure_future(reader.read())
        if "Transfer-Encoding" in headers:  # a chunked body that lies about its end: end it with the connection
            await asyncio.wait({reading}, timeout=CHUNKED_GRACE_S)
            if not reading.done():
                writer.write_eof()
        raw = await asyncio.wait_for(reading, CASE_TIMEOUT_S)
    except ConnectionError:
        raw = b""
    finally:
        if reading is not None and not reading.done():
            reading.cancel()
        writer.close()
        with _suppress():
            await writer.wait_closed()
    if not raw:
        return None, {}, b""
    head, _, content = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    response_headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        response_headers[key.strip().lower()] = value.strip()
    if response_headers.get("transfer-encoding") == "chunked":
        content = _unchunk(content)
    return int(status_line.split()[1]), response_headers, content


def _unchunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2 :]
    return b"".join(out)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ConnectionError, OSError))  # type: ignore[arg-type]


def _check(label: str, status: int | None, headers: dict[str, str], content: bytes) -> None:
    assert status is None or status < 500, f"{label}: HTTP {status}: {content[:300]!r}"
    if status is not None and 400 <= status < 500 and headers.get("content-type", "").startswith("application/json"):
        error = json.loads(content)["error"]
        assert isinstance(error, str) and error and "\n" not in error, (label, error)
    if status == 200:
        assert headers["content-type"].startswith("text/event-stream"), label
        assert b"event: final" in content or b"event: duplicate" in content, (label, content[:300])


@pytest.fixture
def settings() -> Settings:
    return Settings.model_validate(
        {"images": {"max_bytes": 64 * 1024, "max_per_message": 2}, "generation": {"max_new_tokens": 6}}
    )


def test_malformed_requests_never_get_a_5xx(
    tmp_path: Path, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(SEED)
    cases = FIXED + [_mutate(rng) for _ in range(RANDOM_CASES)]

    async def main() -> dict[str, int]:
        db = Database(sqlite_url(tmp_path / "fuzz.db"))
        await db.create_all()
        backend = ScriptedBackend("A red circle.")
        runner = await run_web(BotService(settings, db, backend), "127.0.0.1", 0)
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        seen: dict[str, int] = {}
        started = time.monotonic()
        try:
            for label, ctype, body, headers in cases:
                assert time.monotonic() - started < TOTAL_BUDGET_S, "the fuzz run is too slow"
                status, response_headers, content = await _send(port, ctype, body, headers)
                _check(label, status, response_headers, content)
                seen[str(status)] = seen.get(str(status), 0) + 1

            # The body: a 400 with a one-line JSON error naming the problem.
            status, response_headers, content = await _send(port, *FIXED[0][1:])
            assert status == 400 and response_headers["content-type"].startswith("application/json")
            assert json.loads(content)["error"].startswith("Bad form:")

            # Still answering: a normal message gets its streamed answer.
            status, _, content = await _send(port, MULTIPART, _body(_valid_parts("after-fuzz")), {})
            assert status == 200, content[:300]
            assert b'event: final\ndata: {"text": "A red circle."' in content, content[-400:]
            assert backend.calls and backend.calls[-1]["turns"][-1]["text"].startswith("What is this?")
        finally:
            await runner.cleanup()
            await db.dispose()
        return seen

    with caplog.at_level(logging.INFO):
        seen = asyncio.run(main())
    assert int(seen.get("400", 0)) >= len(FIXED) // 2, seen  # most cases are refused, not silently accepted
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [f"{r.name}: {r.getMessage()}" for r in noisy[:5]]
    refused = [r for r in caplog.records if r.name == "adapters.web" and "bad form" in r.getMessage().lower()]
    assert refused and all("\n" not in r.getMessage() for r in refused)


def test_non_utf8_text_is_decoded_with_replacement(tmp_path: Path, settings: Settings) -> None:
    """Text fields are UTF-8; undecodable bytes become U+FFFD (never invalid data); a declared charset is honoured."""

    async def main() -> None:
        db = Database(sqlite_url(tmp_path / "utf8.db"))
        await db.create_all()
        backend = ScriptedBackend("ok")
        runner = await run_web(BotService(settings, db, backend), "127.0.0.1", 0)
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        try:
            image = _valid_parts()[3]
            latin = b"Content-Type: text/plain; charset=latin-1\r\n"
            for text_part, expected in (
                (_part(b"text", b"caf\xe9 \xff ok"), "caf\ufffd \ufffd ok"),
                (_part(b"text", b"caf\xe9", latin), "caf\u00e9"),
            ):
                body = _body([_part(b"thread", b"t-utf8"), text_part, image])
                status, _, content = await _send(port, MULTIPART, body, {})
                assert status == 200, content[:300]
                seen = backend.calls[-1]["turns"][-1]["text"]
                assert seen == expected, seen
                seen.encode("utf-8")  # valid: no lone surrogates
        finally:
            await runner.cleanup()
            await db.dispose()

    asyncio.run(main())
