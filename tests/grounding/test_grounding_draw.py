"""The boxes drawn on the picture, checked by pixels: edges where the 0–100 corners put them, the rest of the
picture untouched, a colour per phrase, labels inside the picture and apart (issue 24)."""

from __future__ import annotations

import io

from PIL import Image

from bot.core.grounding import COLORS, _label_place, draw_boxes, parse_grounding
from tests.pictures import png

GRAY = (128, 128, 128)


def _png(size: tuple[int, int], color: tuple[int, int, int] = GRAY) -> bytes:
    return png(color, size)


def _drawn(answer: str, size: tuple[int, int], long_side: int) -> Image.Image:
    png = draw_boxes(_png(size), parse_grounding(answer).phrases, long_side)
    assert png.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(png)).convert("RGB")


def test_grounding_box_edges_where_the_corners_put_them() -> None:
    image = _drawn("<p>a red square</p> {<10><20><40><60>}", (200, 100), 400)  # scaled ×2: 400×200
    assert image.size == (400, 200)
    left, top, right, bottom = 40, 40, 160, 120  # 10 %, 20 %, 40 %, 60 % of 400×200
    red = COLORS[0]
    for y in (60, 80, 110):
        assert image.getpixel((left, y)) == red and image.getpixel((right, y)) == red
    for x in (60, 100, 150):
        assert image.getpixel((x, bottom)) == red and image.getpixel((x, top + 1)) == red
    assert image.getpixel((left - 2, 80)) == GRAY and image.getpixel((right + 2, 80)) == GRAY  # 2 px lines
    assert image.getpixel((100, 80)) == GRAY  # inside the box: the picture as it was
    # Everything that changed is on the box's edges or in its label (above the box's top-left corner).
    changed = [(x, y) for y in range(200) for x in range(400) if image.getpixel((x, y)) != GRAY]
    on_edges = {(x, y) for x, y in changed if left <= x <= right and top <= y <= bottom
                and (x - left < 2 or right - x < 2 or y - top < 2 or bottom - y < 2)}  # fmt: skip
    label = [(x, y) for x, y in changed if (x, y) not in on_edges]
    assert label and all(left <= x < left + 160 and 0 <= y < top for x, y in label)
    assert any(image.getpixel(p) == (0, 0, 0) for p in label)  # the phrase, in black
    assert image.getpixel((left + 2, top - 6)) == red  # the label's colour swatch


def test_grounding_aspect_ratio_kept_and_long_side_scaled() -> None:
    answer = "{<0><0><50><50>}"
    assert _drawn(answer, (300, 100), 600).size == (600, 200)
    assert _drawn(answer, (100, 300), 600).size == (200, 600)
    assert _drawn(answer, (4000, 1000), 800).size == (800, 200)  # down as well as up


def test_grounding_a_colour_per_phrase_and_delim_groups_in_theirs() -> None:
    answer = "<p>cups</p> {<10><10><20><30>}<delim>{<60><10><70><30>} and <p>a plate</p> {<10><60><90><90>}"
    image = _drawn(answer, (200, 200), 400)
    cups, plate = COLORS[0], COLORS[1]
    assert image.getpixel((40, 100)) == cups and image.getpixel((240, 100)) == cups  # both boxes of "cups"
    assert image.getpixel((40, 300)) == plate and image.getpixel((360, 300)) == plate


def test_grounding_bare_refer_box_has_no_label() -> None:
    image = _drawn("{<25><25><75><75>}", (100, 100), 200)
    changed = [(x, y) for y in range(200) for x in range(200) if image.getpixel((x, y)) != GRAY]
    assert changed and all(image.getpixel(p) == COLORS[0] for p in changed)  # the box and nothing else


def _swatch_rows(image: Image.Image, x: int, color: tuple[int, int, int]) -> set[int]:
    return {y for y in range(image.height) if image.getpixel((x, y)) == color}


def test_grounding_labels_do_not_overlap_and_stay_inside() -> None:
    # Three phrases whose boxes start at the same corner: three labels, one under the other.
    answer = "<p>a cat</p> {<10><30><50><90>} <p>a hat</p> {<10><30><40><60>} <p>a bat</p> {<10><30><30><50>}"
    image = _drawn(answer, (200, 200), 400)
    rows = [_swatch_rows(image, 43, c) - _swatch_rows(image, 100, c) for c in COLORS[:3]]  # swatch, not box line
    assert all(rows) and not (rows[0] & rows[1]) and not (rows[1] & rows[2]) and not (rows[0] & rows[2])

    # A box in the top-right corner with a long phrase: the label goes below the top edge, shifted left,
    # cut with … to the picture's width.
    long = "a very long name for the small thing in the corner of this picture"
    image = _drawn(f"<p>{long}</p> {{<90><0><100><10>}}", (200, 100), 400)
    assert image.size == (400, 200)
    white = [x for x in range(400) if image.getpixel((x, 8)) not in (GRAY, COLORS[0])]
    assert white and min(white) < 360  # moved left of the box's corner to fit


def test_grounding_label_place_rules() -> None:
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(4):
        taken.append(_label_place((10, 50, 60, 90), (40, 12), (100, 100), taken))
    assert taken[0] == (10, 38, 50, 50)  # above the box
    assert all(min(x1, y1) >= 0 and max(x2, y2) <= 100 for x1, y1, x2, y2 in taken)
    assert len({t[1] for t in taken}) == 4  # none on another
    assert _label_place((90, 0, 100, 10), (40, 12), (100, 100), []) == (60, 0, 100, 12)  # inside, shifted left
