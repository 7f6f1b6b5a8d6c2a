"""The message form: multipart (with pictures) or urlencoded, every byte counted against the upload limit, a
malformed body refused as the client's mistake (a 400 and one log line, never a 500)."""

from __future__ import annotations

import codecs
import logging
import re
import warnings
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam

from adapters.web.common import _one_line, log
from bot.core.frontend_api import Core
from bot.core.requests import ImageAttachment

UPLOAD_SLACK = 256 * 1024  # form fields and multipart framing on top of the pictures
FIELD_LIMIT = 32 * 1024  # one text field (question, ids, name)
MAX_PARTS = 64
SURROGATES_RE = re.compile("[\ud800-\udfff]")
PLAIN_TRANSFER = {"", "binary", "7bit", "8bit"}  # Content-Transfer-Encoding values that leave the bytes as they are

# What aiohttp's form and multipart readers raise on a malformed body: ValueError (bad framing or
# boundary, a bad part Content-Length, a non-ASCII ``_charset_``; also this module's BadForm),
# RuntimeError (an over-long ``_charset_`` field) and HttpProcessingError (bad part headers: no colon,
# a line over 8 KiB, too many; broken chunked framing).  Each is the client's mistake: a 400, never a 500.
MALFORMED_BODY: tuple[type[Exception], ...] = (ValueError, RuntimeError, HttpProcessingError)

# aiohttp warns (on stderr, through ``warnings``) about a malformed Content-Disposition and then reads the
# part as unnamed; ``_read_form`` refuses unnamed parts with a 400 and one log line, so the warning is noise.
warnings.filterwarnings("ignore", category=BadContentDispositionHeader)
warnings.filterwarnings("ignore", category=BadContentDispositionParam)


class _QuietBadRequests(logging.Filter):
    """aiohttp answers a request it cannot parse (request line, headers, chunked framing) with a 400 of its
    own but logs it at ERROR with a traceback: a client's mistake gets one INFO line here instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            log.info("bad HTTP request from %s (%s): %s", remote, type(exc).__name__, _one_line(exc))
            return False
        return True


if not any(isinstance(f, _QuietBadRequests) for f in logging.getLogger("aiohttp.server").filters):
    logging.getLogger("aiohttp.server").addFilter(_QuietBadRequests())


class UploadTooLarge(Exception):
    pass


class BadForm(ValueError):
    """The form is well framed but not what the page sends (no name, too many parts, an encoded part …)."""


def upload_limit(core: Core) -> int:
    """The most bytes one message may upload: every picture at its size limit, plus slack for the fields."""
    images = core.image_limits
    return images.max_bytes * images.max_per_message + UPLOAD_SLACK


def _decode_text(data: bytes, charset: str) -> str:
    """Form text as ``str``: in the part's declared charset (default UTF-8), undecodable bytes as U+FFFD.

    An unknown charset, or a codec that is not a text encoding (``base64`` …), is :class:`BadForm` (a 400).
    Lone surrogates (which some codecs produce) are replaced too, so a field is always valid Unicode that
    encodes to UTF-8.
    """
    try:
        codecs.lookup(charset)
        text = data.decode(charset, errors="replace")
    except LookupError:
        raise BadForm(f"unknown charset {charset[:40]!r}") from None
    return SURROGATES_RE.sub("\ufffd", text)


async def _read_form(request: web.Request, limit: int) -> tuple[dict[str, str], list[ImageAttachment]]:
    """Parse the multipart form, counting every byte against ``limit`` (raises :class:`UploadTooLarge`).

    A malformed body raises one of :data:`MALFORMED_BODY`.  Text fields are decoded as described in
    :func:`_decode_text`; unknown field names are ignored; every part must have a name (RFC 7578).
    """
    fields: dict[str, str] = {}
    images: list[ImageAttachment] = []
    total = 0
    reader = await request.multipart()
    parts = 0
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):  # nested multipart: not something the page sends
            raise BadForm("nested multipart bodies are not supported")
        parts += 1
        if parts > MAX_PARTS:
            raise BadForm("too many form parts")
        name = part.name
        if not name:  # no Content-Disposition, or one aiohttp could not read
            raise BadForm("a form part has no name (Content-Disposition: form-data; name=...)")
        transfer = part.headers.get("Content-Transfer-Encoding", "").strip().lower()
        encoding = part.headers.get("Content-Encoding", "identity").strip().lower()
        if transfer not in PLAIN_TRANSFER or encoding not in ("", "identity"):
            raise BadForm(f"the field {name[:40]!r} is encoded ({transfer or encoding}); send it as plain bytes")
        cap = limit if name == "image" else FIELD_LIMIT
        chunks: list[bytes] = []
        size = 0
        while chunk := await part.read_chunk(64 * 1024):
            size += len(chunk)
            total += len(chunk)
            if total > limit:
                raise UploadTooLarge()
            if size > cap:
                raise BadForm(f"the field {name[:40]!r} is too long")
            chunks.append(chunk)
        data = b"".join(chunks)
        if name == "image":
            if data or part.filename:  # an empty file input still sends an empty part
                mime = part.headers.get("Content-Type", "")
                images.append(ImageAttachment(data=data, filename=part.filename or "", mime=mime))
        else:
            fields[name] = _decode_text(data, part.get_charset(default="utf-8"))
    return fields, images


async def _read_urlencoded(request: web.Request) -> dict[str, str]:
    """A text-only ``application/x-www-form-urlencoded`` form, decoded like :func:`_read_form`'s text fields."""
    charset = request.charset or "utf-8"
    body = _decode_text(await request.read(), charset)  # read() enforces client_max_size (413)
    pairs = parse_qsl(body, keep_blank_values=True, encoding=charset, errors="replace", max_num_fields=MAX_PARTS)
    fields = {}
    for name, value in pairs:
        if len(value) > FIELD_LIMIT:
            raise BadForm(f"the field {name[:40]!r} is too long")
        fields[name] = SURROGATES_RE.sub("\ufffd", value)
    return fields
