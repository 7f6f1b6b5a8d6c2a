"""Neutralise mass mentions in model output before it reaches a channel."""

from __future__ import annotations

import re

__all__ = ["sanitize_output"]

_ZWSP = "\u200b"
_PATTERNS = [
    (re.compile(r"@(everyone|here|channel)\b", re.IGNORECASE), lambda m: "@" + _ZWSP + m.group(1)),
    (re.compile(r"<!(everyone|here|channel)(\|[^>]*)?>", re.IGNORECASE), lambda m: "@" + _ZWSP + m.group(1)),
    (re.compile(r"<!subteam\^[^>]*>"), lambda m: "@" + _ZWSP + "group"),
    (re.compile(r"<@&(\d+)>"), lambda m: "@" + _ZWSP + "role"),
]


def sanitize_output(text: str) -> str:
    """Break ``@everyone``/``@here``/``@channel``, Slack ``<!here>``-style and role/group mentions."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text
