"""``identify x1 y1 x2 y2``: the region the user asked about is drawn on the returned picture, dashed in black
and white and labelled "asked" (unlike any phrase's solid colour), checked by pixels — on its own, beside an
answer's boxes, and through the core for an answer with no boxes of its own."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from test_grounding_core import V2, _replies, ask, png, run

from bot.core.grounding import ASKED_DASHES, COLORS, Box, asked_region, draw_boxes, parse_grounding
from bot.core.service import BotService
from tests import pictures
from tests.scripted_backend import ScriptedBackend

BLACK, WHITE = ASKED_DASHES
GRAY = (128, 128, 128)


def _image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _edge(image: Image.Image, rect: tuple[int, int, int, int]) -> list[tuple[int, int, int]]:
    """The outline's pixels: bottom, left and right (the label sits on the top edge)."""
    left, top, right, bottom = rect
    bottom_edge = [image.getpixel((x, bottom)) for x in range(left, right + 1)]
    left_edge = [image.getpixel((left, y)) for y in range(top + 1, bottom + 1)]
    return bottom_edge + left_edge + [image.getpixel((right, y)) for y in range(top + 1, bottom + 1)]


def changed_outside(image: Image.Image, rect: tuple[int, int, int, int], line: int) -> list[tuple[int, int]]:
    """The pixels that differ from the gray picture and are not on ``rect``'s ``line``-wide outline."""
    left, top, right, bottom = rect
    width, height = image.size
    return [(x, y) for y in range(height) for x in range(width) if image.getpixel((x, y)) != GRAY
            and not (left <= x <= right and top <= y <= bottom
                     and min(x - left, right - x, y - top, bottom - y) < line)]  # fmt: skip


def test_the_asked_region_is_dashed_black_and_white_with_its_label() -> None:
    image = _image(draw_boxes(pictures.png(GRAY, (200, 100)), (), 400, asked=Box(10, 20, 40, 60)))
    rect = (40, 40, 160, 120)  # 10 %, 20 %, 40 %, 60 % of 400×200
    edge = _edge(image, rect)
    assert set(edge) == {BLACK, WHITE} and edge.count(BLACK) > 10 and edge.count(WHITE) > 10  # dashes
    assert image.getpixel((100, 80)) == GRAY and image.getpixel((37, 80)) == GRAY  # inside and outside: as it was
    label = changed_outside(image, rect, line=2)
    assert label and all(40 <= x < 200 and 0 <= y < 40 for x, y in label)  # "asked", above the region
    assert not any(image.getpixel(p) in COLORS for p in label)


def test_the_asked_region_and_the_answers_boxes_are_both_drawn() -> None:
    phrases = parse_grounding("<p>a cup</p> {<50><10><90><90>}").phrases
    image = _image(draw_boxes(pictures.png(GRAY, (200, 100)), phrases, 400, asked=Box(10, 20, 40, 60)))
    assert set(_edge(image, (40, 40, 160, 120))) == {BLACK, WHITE}
    assert image.getpixel((200, 100)) == COLORS[0] and image.getpixel((360, 100)) == COLORS[0]  # the cup, solid


def test_asked_region_reads_only_identify_questions() -> None:
    assert asked_region("[identify] what is this {<4><50><30><65>}") == Box(4, 50, 30, 65)
    for other in ("[refer] the cup {<4><50><30><65>}", "[identify] what is this", "[identify] x {<4><50><30>}",
                  "[identify] what is this {<4><50><130><65>}", "What is this?"):  # fmt: skip
        assert asked_region(other) is None


def test_an_identify_answer_comes_back_with_the_region_on_the_picture(tmp_path: Path) -> None:
    backend = ScriptedBackend("A chicken nugget.")

    async def body(service: BotService) -> None:
        (reply,) = await _replies(service, ask("identify 10 20 61 81", png(GRAY)))
        assert reply.text == "A chicken nugget."  # the answer as written: it had no boxes
        (file,) = reply.files
        assert file.filename == "boxes.png"
        image = _image(file.data)  # 800×400 ([grounding] long_side): the region 10 %–60 % × 20 %–80 %
        assert set(_edge(image, (80, 80, 480, 320))) == {BLACK, WHITE}
        (plain,) = await _replies(service, ask("What is it?", thread="t2"))  # no picture, no region: none
        (other,) = await _replies(service, ask("/refer the cup", png(GRAY), thread="t3"))
        assert plain.files == () and other.files == ()

    run(tmp_path, V2, backend, body)
