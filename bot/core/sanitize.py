"""Text hygiene, done once in the core: clean what goes into the database or out to a platform.

* :func:`clean_text` — every text that is stored or sent: drops NUL and the other C0 control
  characters except tab and newline (CRLF and CR become newline; PostgreSQL rejects ``\\x00`` in text; chat
  platforms reject or garble controls), plus DEL, and replaces lone surrogates (which cannot be
  encoded as UTF-8) with U+FFFD.  Pasted text and model byte-tokens produce both.
* :func:`sanitize_output` — model output on top of that: breaks mass mentions (``@everyone``,
  Slack ``<!here>``, Discord role pings) so an answer can never page a whole channel.
"""

from __future__ import annotations

import re

__all__ = ["clean_text", "sanitize_output"]

_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NEWLINES = re.compile(r"\r\n?")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_ZWSP = "\u200b"
_PATTERNS = [
    (re.compile(r"@(everyone|here|channel)\b", re.IGNORECASE), lambda m: "@" + _ZWSP + m.group(1)),
    (re.compile(r"<!(everyone|here|channel)(\|[^>]*)?>", re.IGNORECASE), lambda m: "@" + _ZWSP + m.group(1)),
    (re.compile(r"<!subteam\^[^>]*>"), lambda m: "@" + _ZWSP + "group"),
    (re.compile(r"<@&(\d+)>"), lambda m: "@" + _ZWSP + "role"),
]


def clean_text(text: str) -> str:
    """``text`` without control characters (tab and newlines kept, CR/CRLF as ``\\n``), lone surrogates replaced."""
    text = _CONTROLS.sub("", _NEWLINES.sub("\n", text))
    return _SURROGATES.sub("\ufffd", text)


def sanitize_output(text: str) -> str:
    """Clean model output and break ``@everyone``/``@here``/``@channel``, ``<!here>`` and role/group mentions."""
    text = clean_text(text)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text
