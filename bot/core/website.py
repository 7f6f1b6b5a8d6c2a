"""Finding the web page in a ``website`` answer, and completing one the token limit cut off.

MiniGPT-4 answers a sketch with HTML: in a ```` ```html ```` fence (what the preset asks for), in an
unlabelled fence, or bare.  :func:`extract_html` returns the document and whether it had to be
repaired: an answer cut off at ``max_new_tokens`` ends mid-tag or with elements still open, so the
partial tag is dropped and every open element is closed in order (the void elements need none).
Parsing uses the standard library's tolerant :class:`html.parser.HTMLParser`, which never executes
anything; the document itself is only ever rendered in the sandbox (:mod:`bot.core.screenshot`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

__all__ = ["HtmlDocument", "extract_html"]

_FENCED = re.compile(r"```[ \t]*(html|htm|xhtml)?[ \t]*\n(.*?)(?:\n```|\Z)", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n]*\n.*?(?:\n```|\Z)", re.DOTALL)
_BARE = re.compile(r"(<!doctype\s+html\b|<html\b)", re.IGNORECASE)
_VOID = {
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr",
}  # fmt: skip


@dataclass(frozen=True)
class HtmlDocument:
    """The page to render and offer as a file; ``repaired`` when closing tags had to be added."""

    html: str
    repaired: bool = False


class _OpenElements(HTMLParser):
    """Tracks the stack of open elements, and where the last complete token ended."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass  # <br/>, <div/>: nothing stays open

    def handle_endtag(self, tag: str) -> None:
        if tag in self.stack:  # close it and anything left open inside it (browsers do the same)
            while self.stack and self.stack.pop() != tag:
                pass


def _looks_like_html(text: str) -> bool:
    return bool(_BARE.search(text)) or bool(re.search(r"<(body|head|div|table|form|h1|p)\b", text, re.IGNORECASE))


def _cut_partial_tag(text: str) -> str:
    """Drop a tag (or comment) the cut left unfinished at the end, e.g. ``<div cla``."""
    last_open, last_close = text.rfind("<"), text.rfind(">")
    if last_open > last_close:
        return text[:last_open].rstrip()
    if text.rfind("<!--") > text.rfind("-->"):
        return text[: text.rfind("<!--")].rstrip()
    return text


def _complete(html: str) -> tuple[str, bool]:
    """``html`` with a cut-off tail repaired: (document, whether anything was added or removed)."""
    trimmed = _cut_partial_tag(html.rstrip())
    parser = _OpenElements()
    parser.feed(trimmed)
    parser.close()
    still_open = parser.stack
    if not still_open:
        return trimmed, trimmed != html.rstrip()
    closing = "".join(f"</{tag}>" for tag in reversed(still_open))
    return f"{trimmed}\n{closing}", True


def extract_html(answer: str) -> HtmlDocument | None:
    """The HTML document in ``answer`` (the longest fenced one, else a bare one), or ``None`` when it holds none."""
    candidates = [m.group(2) for m in _FENCED.finditer(answer) if m.group(1) or _looks_like_html(m.group(2))]
    if candidates:
        body = max(candidates, key=len)  # the page, not a one-line snippet before it
    else:
        outside = _ANY_FENCE.sub("", answer)  # a page quoted inside another language's code block is not one
        match = _BARE.search(outside)
        if match is None:
            return None
        body = outside[match.start() :]
        end = re.search(r"</html\s*>", body, re.IGNORECASE)
        if end is not None:
            body = body[: end.end()]
    body = body.strip()
    if not body or not _looks_like_html(body):
        return None
    html, changed = _complete(body)
    return HtmlDocument(html=html, repaired=changed)
