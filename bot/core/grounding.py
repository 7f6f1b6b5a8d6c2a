"""MiniGPT-v2's grounding, shown: boxes in an answer drawn on the user's picture, the answer's text cleaned.

MiniGPT-v2 answers its ``[grounding]``, ``[refer]``, ``[detection]`` and ``[identify]`` tasks with boxes in
the text: ``<p>a red square</p> {<10><20><40><60>}`` — corners (left, top, right, bottom) in 0–100 bins of
the original width and height, several boxes of one phrase joined by ``<delim>``, a ``[refer]`` answer a
bare ``{<x1><y1><x2><y2>}`` (the reference's ``demo_v2.py`` and its datasets).  Raw, a chat user sees only
those tokens.  This module

* parses them (:func:`parse_grounding`) — stricter than the demo in one place: a box must be written as a
  box (``{<a><b><c><d>}``), where the demo took any answer with exactly four numbers in it for a
  ``[refer]`` box (``3 cats, 2 dogs, 1 bird and 5 fish`` would be one); malformed boxes and corners outside
  0–100 are ignored, never an error;
* cleans the text: each phrase kept in Markdown bold (``**a red square**``: Discord and the web chat show it
  bold), the ``{<..>}``, ``<p>``, ``</p>`` and ``<delim>`` tokens removed;
* draws the boxes with Pillow (:func:`draw_boxes`) on the picture the answer is about, its aspect ratio
  kept and its long side scaled to ``[grounding] long_side``: a colour per phrase (the demo's palette), the
  phrase as a label in Pillow's default font that stays inside the picture and never overlaps another;
* gives the ``identify`` preset its region (:func:`identify_region`): ``identify 10 20 60 80`` in
  percentages becomes the reference's ``[identify] what is this {<10><20><59><79>}``.

:class:`GroundedPictures` puts it together for the core: any final answer with boxes — whatever the
backend, whatever the preset — gets the annotated picture as a :class:`~bot.core.requests.ReplyFile`
(``boxes.png``), posted the way website previews are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import math
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from bot.core.config import GroundingSettings
from bot.core.errors import UserInputError
from bot.core.requests import Final, ReplyFile

__all__ = [
    "ASKED",
    "COLORS",
    "TASK_PRESETS",
    "Box",
    "GroundedPictures",
    "Grounding",
    "Phrase",
    "asked_region",
    "bold_spans",
    "draw_boxes",
    "identify_region",
    "parse_grounding",
    "settled",
    "task_help",
    "task_question",
]

log = logging.getLogger(__name__)

TASK_PRESETS: dict[str, str] = {
    "grounding": "[grounding] describe this image in detail",
    "refer": "[refer]",
    "detection": "[detection]",
    "identify": "[identify] what is this",
    "vqa": "[vqa]",
    "caption": "[caption] please describe this image?",
}
"""MiniGPT-v2's task prompts (``variant = "minigptv2"`` only): the reference demo's task shortcuts
(``gradio_taskselect``), and for ``[caption]`` the COCO caption dataset's question.  The words a user adds
follow the tag (``/refer the red car`` → ``[refer] the red car``)."""

NEEDS_WORDS: dict[str, str] = {
    "refer": "Say what to find after refer, e.g. /refer the red car.",
    "detection": "Say what to look for after detection, e.g. /detection cups, plates.",
    "vqa": "Ask your question after vqa, e.g. /vqa what colour is the car?",
    "identify": (
        "identify takes a region of the picture as four percentages, left top right bottom (0–100): "
        "identify 10 20 60 80."
    ),
}
"""The task presets that mean nothing without the user's words, and what the user is told."""

REGION_PRESET = "identify"
"""The preset whose words are a region (``identify x1 y1 x2 y2``), sent as a box."""

COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (210, 210, 0), (255, 0, 255), (0, 255, 255), (114, 128, 250),
    (0, 165, 255), (0, 128, 0), (144, 238, 144), (238, 238, 175), (255, 191, 0), (226, 43, 138), (0, 215, 255),
)  # fmt: skip
"""One colour per phrase, in order: the demo's palette (RGB), its two repeated entries left out."""

BINS = 100

ASKED = "asked"
"""The label of the region an ``identify`` question asked about, drawn in :data:`ASKED_DASHES`."""
ASKED_DASHES = ((0, 0, 0), (255, 255, 255))
"""Corners are integers 0–100 of the original width and height (the demo's ``bounding_box_size``)."""

_NUMBER = r"-?\d+(?:\.\d+)?%?"
_REGION = re.compile(rf"^\s*({_NUMBER})(?:\s*[,\s]\s*({_NUMBER})){{3}}\s*$")
_REGION_ASK = re.compile(rf"^([A-Za-z]+)\s+({_NUMBER}(?:\s*[,\s]\s*{_NUMBER}){{3}})\s*[.!?]?$")
"""``identify 10 20 60 80`` (also ``10, 20, 60, 80`` and ``10% 20% 60% 80%``) — a preset by its form."""

_BIN = r"<\s*-?\d+\s*>"
_ONE = rf"\{{\s*(?:{_BIN}\s*)*(?:<delim>\s*(?:{_BIN}\s*)*)*\}}"  # {<1><2><3><4>} or {<1>…<4><delim><5>…<8>}
_GROUP = rf"{_ONE}(?:\s*<delim>\s*{_ONE})*"  # {<1>…<4>}<delim>{<5>…<8>}, as the demo's cleaner expects
_TOKEN = re.compile(
    rf"<p>(?P<phrase>(?:(?!</?p>)[^\n]){{0,200}}?)</p>(?P<boxes>[ \t]*{_GROUP})?|(?P<bare>[ \t]*{_GROUP})"
)
_LEFTOVER = re.compile(r"</?p>|<delim>|[ \t]*\{\s*(?:<[^{}\n]*)?$")
"""Stray tags, and a box the answer length limit cut off at the very end (``{<10><2``)."""
_BOLD_BREAKERS = re.compile(r"[*`]")
_CUT = "\x00"
"""Where a token was taken out, until the spaces round it are settled (model text never holds NUL: the core
cleans it of control characters).  Only the spaces next to a removed token change, so code and prose
elsewhere keep theirs, and a streamed answer's text before its first token is the cleaned text's start."""
_CUT_EDGE = re.compile(r"[ \t]*\x00[ \t\x00]*(?=[.,;:!?\n]|$)|^[ \t\x00]*\x00[ \t]*", re.M)
"""A token before punctuation or at a line's end goes with the spaces before it; at a line's start, with
the spaces after it."""
_CUT_SPACE = re.compile(r"[ \t]*\x00[ \t\x00]*")
"""A token between words: one space, if there was any round it."""


@dataclass(frozen=True)
class Box:
    """One box: corners in 0–100 bins of the picture's width (``x``) and height (``y``)."""

    x1: int
    y1: int
    x2: int
    y2: int


@dataclass(frozen=True)
class Phrase:
    """The boxes of one phrase (``label`` empty for a bare ``[refer]`` box), drawn in one colour."""

    label: str
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class Grounding:
    """What an answer's boxes say: the phrases with their boxes, and the answer's cleaned text."""

    phrases: tuple[Phrase, ...]
    text: str

    @property
    def box_count(self) -> int:
        return sum(len(p.boxes) for p in self.phrases)


def _boxes(group: str) -> list[Box]:
    """The valid boxes of one ``{…}<delim>{…}`` group: four corners each, 0–100, left ≤ right, top ≤ bottom."""
    found = []
    for part in group.split("<delim>"):
        values = [int(v) for v in re.findall(r"<\s*(-?\d+)\s*>", part)]
        if len(values) != 4 or not all(0 <= v <= BINS for v in values):
            continue  # malformed, or out of range: ignored
        x1, y1, x2, y2 = values
        if x1 <= x2 and y1 <= y2:
            found.append(Box(x1, y1, x2, y2))
    return found


def parse_grounding(answer: str) -> Grounding:
    """The boxes in ``answer`` by phrase (in the order phrases first appear; a phrase named twice keeps one
    colour), and the text with phrases in bold and the box tokens removed.  Never raises."""
    by_label: dict[str, list[Box]] = {}

    def replace(match: re.Match[str]) -> str:
        if match.group("bare") is not None:
            by_label.setdefault("", []).extend(_boxes(match.group("bare")))
            return _CUT
        label = " ".join(match.group("phrase").split())
        cut = ""
        if match.group("boxes") is not None and label:
            by_label.setdefault(label, []).extend(_boxes(match.group("boxes")))
            cut = _CUT
        shown = " ".join(_BOLD_BREAKERS.sub("", label).split())  # a * or ` in it would break the bold
        return (f"**{shown}**" if shown else label) + cut

    text = _LEFTOVER.sub(_CUT, _TOKEN.sub(replace, answer.replace(_CUT, "")))
    text = _CUT_SPACE.sub(lambda m: " " if m.group().strip("\x00") else "", _CUT_EDGE.sub("", text)).strip()
    unlabelled = by_label.pop("", [])
    phrases = [Phrase(label, tuple(boxes)) for label, boxes in by_label.items() if boxes]
    if unlabelled:
        phrases.append(Phrase("", tuple(unlabelled)))
    return Grounding(tuple(phrases), text)


_BOLD = re.compile(r"```[\s\S]*?(?:```|$)|`[^`\n]*`|\*\*(?P<bold>[^*`\s](?:[^*`\n]*[^*`\s])?)\*\*")
"""``**phrase**`` outside code: fenced blocks and inline code are matched first, so they are left as written."""


def bold_spans(text: str) -> list[tuple[str, bool]]:
    """``text`` in pieces, each with whether it is bold: the ``**phrase**`` marking of the cleaned answer
    (and of any Markdown bold the model wrote) for front ends that show bold their own way — rich text in a
    terminal, ``*x*`` in Slack — without the asterisks.  Code (fenced or inline) is never bold."""
    spans: list[tuple[str, bool]] = []
    at = 0
    for match in _BOLD.finditer(text):
        if match.group("bold") is None:
            continue
        if match.start() > at:
            spans.append((text[at : match.start()], False))
        spans.append((match.group("bold"), True))
        at = match.end()
    if at < len(text):
        spans.append((text[at:], False))
    return spans


_TOKEN_START = re.compile(r"</?p>|<delim>|\{\s*(?:[<}]|$)")
_TOKEN_PREFIXES = ("<p>", "</p>", "<delim>")


def settled(streamed: str) -> int:
    """How much of an answer still streaming the cleaner will leave as it is, whatever follows: the text
    before its first box or phrase token (``<p>``, ``{<``, ``<delim>``, or what may become one at its end),
    less the spaces the cleaner may take with that token.  For a front end that cannot take back what it
    sent (the OpenAI API's stream): it holds the rest until the final text."""
    match = _TOKEN_START.search(streamed)
    end = match.start() if match else len(streamed)
    tail = streamed[max(0, end - 6) : end]
    for i in range(len(tail)):
        if any(p.startswith(tail[i:]) for p in _TOKEN_PREFIXES):
            end -= len(tail) - i
            break
    return len(streamed[:end].rstrip())


def identify_region(words: str) -> str:
    """The box of ``identify x1 y1 x2 y2`` (percentages, left top right bottom) as the reference sends it.

    The demo turns a drawn mask into a box by resizing it to 100×100 and taking the first and last marked
    row and column (``mask2bbox``): a region from 10 % to 60 % covers mask columns 10 to 59.  Raises
    :class:`~bot.core.errors.UserInputError` with what is wrong."""
    if _REGION.match(words) is None:
        raise UserInputError(NEEDS_WORDS[REGION_PRESET])
    values = [float(v.rstrip("%")) for v in re.findall(_NUMBER, words)]
    if not all(0 <= v <= 100 for v in values):
        bad = next(v for v in values if not 0 <= v <= 100)
        raise UserInputError(f"The region's corners are percentages from 0 to 100 (got {bad:g}). "
                             + NEEDS_WORDS[REGION_PRESET])  # fmt: skip
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise UserInputError(
            "The region goes left, top, right, bottom: the right edge after the left one and the bottom below "
            f"the top (got {words.strip()}). " + NEEDS_WORDS[REGION_PRESET]
        )
    first = [min(math.floor(v), BINS - 1) for v in (x1, y1)]
    last = [max(lo, min(math.ceil(v) - 1, BINS - 1)) for v, lo in zip((x2, y2), first, strict=True)]
    return "{" + "".join(f"<{v}>" for v in (*first, *last)) + "}"


def region_words(text: str, presets: list[str]) -> tuple[str, str] | None:
    """``(preset, region)`` when a message is the region preset followed by four numbers (``identify 10 20 60
    80``): a command by its form, as unmistakable as a slash."""
    match = _REGION_ASK.match(text.strip())
    if match is None or match.group(1).lower() != REGION_PRESET or REGION_PRESET not in presets:
        return None
    return REGION_PRESET, match.group(2)


def task_question(preset: str, prompt: str, words: str) -> str:
    """The text sent for a task preset: its tag prompt and the user's words (the region of ``identify`` as a
    box).  Raises :class:`~bot.core.errors.UserInputError` when the task needs words and has none."""
    words = words.strip()
    if not words and preset in NEEDS_WORDS:
        raise UserInputError(NEEDS_WORDS[preset])
    if preset == REGION_PRESET:
        return f"{prompt} {identify_region(words)}".strip()
    return f"{prompt} {words}".strip()


def task_help(presets: list[str]) -> str | None:
    """One help line for MiniGPT-v2's task presets, when they are offered (``None`` otherwise)."""
    if not {"grounding", "identify"} <= set(presets):
        return None
    return (
        "• MiniGPT-v2 tasks, boxes drawn on your picture: /grounding (a description with its objects boxed), "
        "/refer the red car (where it is), /detection cups, plates (each one boxed), identify 10 20 60 80 (what "
        "is in that region, in percent: left top right bottom), /vqa your question (a short answer), /caption."
    )


# ---------------------------------------------------------------------------------------------- drawing


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _fit(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    """``text``, cut with … to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _label_place(
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    picture: tuple[int, int],
    taken: list[tuple[int, int, int, int]],
) -> tuple[int, int, int, int]:
    """Where a label goes: above the box's top-left corner (below its top edge when there is no room above),
    shifted left to stay inside the picture, then moved down — or up, when the bottom is reached — a label
    height at a time until it overlaps no label placed before it."""
    (w, h), (pw, ph) = size, picture
    x = max(0, min(box[0], pw - w))
    preferred = box[1] - h if box[1] - h >= 0 else min(box[1], ph - h)
    steps = range(0, max(ph, 1), max(h, 1))
    tries = [preferred + s for s in steps if preferred + s + h <= ph]
    tries += [preferred - s for s in steps if s and preferred - s >= 0]
    for y in tries:
        rect = (x, y, x + w, y + h)
        if not any(_overlaps(rect, t) for t in taken):
            return rect
    return (x, preferred, x + w, preferred + h)  # the picture is full of labels: this one may cover another


def asked_region(question: str) -> Box | None:
    """The region an ``identify`` question asks about (the box :func:`identify_region` put in the text sent
    to the model), so the returned picture can show it; ``None`` for any other question."""
    prompt = TASK_PRESETS[REGION_PRESET]
    if not question.startswith(prompt):
        return None
    found = _boxes("".join(re.findall(r"\{[^{}]*\}", question[len(prompt) :])[-1:]))
    return found[0] if found else None


def _dashed(draw: ImageDraw.ImageDraw, rect: tuple[int, int, int, int], line: int, dash: int) -> None:
    """A rectangle's outline in black and white dashes: the asked region, unlike any phrase's solid colour
    and visible on any picture."""
    x1, y1, x2, y2 = rect
    edges = (((x1, y1), (1, 0), x2 - x1), ((x1, y2 - line + 1), (1, 0), x2 - x1),
             ((x1, y1), (0, 1), y2 - y1), ((x2 - line + 1, y1), (0, 1), y2 - y1))  # fmt: skip
    for (x, y), (dx, dy), length in edges:
        for at in range(0, length + 1, dash):
            n = min(dash, length + 1 - at) - 1
            start = (x + dx * at, y + dy * at)
            end = (start[0] + dx * n + dy * (line - 1), start[1] + dy * n + dx * (line - 1))
            draw.rectangle((*start, *end), fill=ASKED_DASHES[(at // dash) % 2])


def draw_boxes(picture: bytes, phrases: tuple[Phrase, ...], long_side: int, asked: Box | None = None) -> bytes:
    """``picture`` as a PNG, scaled so its long side is ``long_side`` (aspect ratio kept), with every box
    drawn in its phrase's colour and each phrase's label by its first box; ``asked`` (the region of an
    ``identify`` question) dashed, labelled :data:`ASKED`.  CPU-bound: call it off the event loop.  Raises
    Pillow's errors for a picture it cannot read."""
    with Image.open(io.BytesIO(picture)) as source:
        image = source.convert("RGB")  # what the model saw (the first frame of a GIF)
    scale = long_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    width, height = image.size
    line = max(2, round(long_side / 320))
    text_size = max(12, round(long_side / 48))
    font, pad, swatch = _font(text_size), max(2, line), text_size // 2
    draw = ImageDraw.Draw(image)
    placed: list[tuple[int, int, int, int]] = []  # the labels drawn so far
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    labels = ImageDraw.Draw(overlay)
    texts: list[tuple[tuple[int, int], str]] = []
    drawn = [(Phrase(ASKED, (asked,)), ASKED_DASHES[0])] if asked is not None else []
    drawn += [(phrase, COLORS[index % len(COLORS)]) for index, phrase in enumerate(phrases)]
    for phrase, color in drawn:
        for number, b in enumerate(phrase.boxes):
            rect = (
                min(width - 1, round(b.x1 / BINS * width)), min(height - 1, round(b.y1 / BINS * height)),
                min(width - 1, round(b.x2 / BINS * width)), min(height - 1, round(b.y2 / BINS * height)),
            )  # fmt: skip
            if b is asked:
                _dashed(draw, rect, line, 4 * line)
            else:
                draw.rectangle(rect, outline=color, width=line)
            if not phrase.label or number:
                continue  # a bare [refer] box has no label; a phrase is named once, by its first box
            text = _fit(phrase.label, font, width - 3 * pad - swatch)
            # whole pixels (Pillow's annotation says float: range() below would fail on one)
            left, top, right, bottom = (int(v) for v in font.getbbox(text))
            w, h = swatch + 3 * pad + (right - left), (bottom - top) + 2 * pad
            where = _label_place(rect, (w, h), (width, height), placed)
            placed.append(where)
            labels.rectangle(where, fill=(255, 255, 255, 200))
            labels.rectangle((where[0], where[1], where[0] + swatch + pad, where[3]), fill=(*color, 255))
            texts.append(((where[0] + swatch + 2 * pad - left, where[1] + pad - top), text))
    image = Image.alpha_composite(image.convert("RGBA"), overlay)
    writer = ImageDraw.Draw(image)
    for origin, text in texts:
        writer.text(origin, text, fill=(0, 0, 0, 255), font=font)
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue()


class GroundedPictures:
    """Adds the annotated picture to a final answer that contains boxes, and cleans its text."""

    TITLE = "The boxes on your picture"
    FILENAME = "boxes.png"
    ONLY_BOXES = "Marked on the picture."
    """The text of an answer that was boxes only (a ``[refer]`` answer), once they are drawn."""

    def __init__(self, settings: GroundingSettings) -> None:
        self.settings = settings

    def shown(self, answer: str, *, had_picture: bool = True) -> str:
        """A stored answer as :meth:`attach` showed it (history views): cleaned when it holds boxes and they
        were drawn (grounding on, a picture in the thread before it); the model's raw text otherwise.  The
        store keeps the raw text: the model reads its own boxes back in a follow-up, as the reference does."""
        if not self.settings.enabled or not had_picture:
            return answer
        found = parse_grounding(answer)
        return (found.text or self.ONLY_BOXES) if found.phrases else answer

    async def attach(self, final: Final, picture: bytes | None, question: str = "") -> Final:
        """``final`` with ``boxes.png`` (its boxes on ``picture``: the thread's latest) and the cleaned text,
        if it holds boxes or ``question`` asked about a region (``identify``: the region is drawn dashed, so
        the user sees what the answer is about); unchanged otherwise, or when the picture cannot be drawn on
        (one log line)."""
        if not self.settings.enabled or final.kind != "answer" or picture is None:
            return final
        found, asked = parse_grounding(final.text), asked_region(question)
        if not found.phrases and asked is None:
            return final
        try:
            png = await asyncio.to_thread(draw_boxes, picture, found.phrases, self.settings.long_side, asked)
        except Exception as exc:  # a picture the checks let through but Pillow cannot draw on: keep the text
            log.warning("could not draw %d box(es) on the picture: %r", found.box_count, exc)
            return final
        file = ReplyFile(self.FILENAME, "image/png", png, title=self.TITLE)
        meta = {**final.meta, "boxes": found.box_count}
        text = (found.text or self.ONLY_BOXES) if found.phrases else final.text
        return dataclasses.replace(final, text=text, files=(*final.files, file), meta=meta)
