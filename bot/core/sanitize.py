"""Text hygiene, done once in the core: clean what goes into the database or out to a platform.

* :func:`clean_text` — every text that is stored or sent: drops NUL and the other C0 control
  characters except tab and newline (CRLF and CR become newline; PostgreSQL rejects ``\\x00`` in text; chat
  platforms reject or garble controls), plus DEL, and replaces lone surrogates (which cannot be
  encoded as UTF-8) with U+FFFD.  Pasted text and model byte-tokens produce both.
* :func:`sanitize_output` — model output on top of that: breaks mass mentions (``@everyone``,
  Slack ``<!here>``, Discord role pings) so an answer can never page a whole channel.
* :class:`StreamSanitizer` — the same for streamed output, token by token: what it has let out so far
  is always safe, even when a mention, a CRLF or a surrogate pair is split across tokens (it holds such
  a tail back until the next token decides it), and all of it together is ``sanitize_output(answer)``.
"""

from __future__ import annotations

import re

__all__ = ["StreamSanitizer", "clean_text", "sanitize_output"]

_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NEWLINES = re.compile(r"\r\n?")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_ZWSP = "\u200b"
_MASS = ("everyone", "here", "channel")
_PATTERNS = [
    # No word boundary after the name: Discord pings "@everyone" wherever it starts, "@everyones" too.
    (re.compile(r"@(everyone|here|channel)", re.IGNORECASE), lambda m: "@" + _ZWSP + m.group(1)),
    (re.compile(r"<!(everyone|here|channel)(\|[^>]*)?>", re.IGNORECASE), lambda m: "@" + _ZWSP + m.group(1)),
    (re.compile(r"<!subteam\^[^>]*>"), lambda m: "@" + _ZWSP + "group"),
    (re.compile(r"<@&(\d+)>"), lambda m: "@" + _ZWSP + "role"),
]


def clean_text(text: str) -> str:
    """``text`` without control characters (tab and newlines kept, CR/CRLF as ``\\n``), lone surrogates replaced.

    The result encodes as UTF-8, is accepted by PostgreSQL and SQLite and fits a JSON payload of any
    platform; cleaning it again changes nothing.  A high and low surrogate in a row (the two UTF-16 halves
    of one character, as a JavaScript client may send them) become that character.
    """
    text = _NEWLINES.sub("\n", text)
    if _SURROGATES.search(text):  # before the controls go: halves apart stay apart
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return _CONTROLS.sub("", text)


def sanitize_output(text: str) -> str:
    """Clean model output and break ``@everyone``/``@here``/``@channel``, ``<!here>`` and role/group mentions."""
    return _break_mentions(clean_text(text))


def _break_mentions(text: str) -> str:
    """Apply :data:`_PATTERNS` until nothing changes (a replacement can complete another pattern)."""
    for _ in range(8):
        before = text
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        if text == before:
            break
    return text


class StreamSanitizer:
    """Sanitizes streamed output piece by piece: ``feed(token)`` returns the text that is safe to show now,
    ``flush()`` the rest at the end.  Whatever has been returned so far, joined, is valid text with no
    mass mention, and all of it is ``sanitize_output`` of the tokens joined (up to the rare case where a
    replacement decides a later match, which the final answer's text settles)."""

    def __init__(self) -> None:
        self._raw = ""  # a trailing CR or high surrogate, until the next token says what it is
        self._held = ""  # sanitized text that more text could still turn into a mass mention

    def feed(self, token: str) -> str:
        raw = self._raw + token
        cut = len(raw) - 1 if raw and (raw[-1] == "\r" or "\ud800" <= raw[-1] <= "\udbff") else len(raw)
        self._raw = raw[cut:]
        text = _break_mentions(self._held + clean_text(raw[:cut]))
        cut = _mention_start(text)
        self._held = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        text = _break_mentions(self._held + clean_text(self._raw))
        self._raw = self._held = ""
        return text


def _mention_start(text: str) -> int:
    """Where a tail of ``text`` starts that more text could still turn into a mass mention (else its end).

    Every pattern ends at the first ">" after its start and "@everyone" holds no "@" or "<" inside, so
    only the last "@" and a "<" after the last ">" can begin one that is not complete yet.
    """
    start = len(text)
    at = text.rfind("@")
    if at >= 0 and _could_grow(text[at:]):
        start = at
    for i in range(text.rfind(">") + 1, start):
        if text[i] == "<" and _could_grow(text[i:]):
            return i
    return start


def _could_grow(tail: str) -> bool:
    """Whether ``tail`` (from an "@" or a "<") is the unfinished start of a match of one of :data:`_PATTERNS`."""
    low = tail.lower()
    if low.startswith("@"):
        return any(f"@{word}".startswith(low) and len(low) <= len(word) for word in _MASS)
    if not low.startswith("<") or ">" in low:
        return False
    body = low[1:]
    if body in ("", "@", "@&"):
        return True
    if body.startswith("@&"):
        return body[2:].isdecimal()
    if not body.startswith("!"):
        return False
    rest = tail[2:]  # the group pattern is case-sensitive
    if rest.startswith("subteam^") or "subteam^".startswith(rest):
        return True
    name, bar, _label = body[1:].partition("|")
    return name in _MASS if bar else any(word.startswith(name) for word in _MASS)
