"""The annotated picture as the web chat and the terminal show it (Slack: tests/slack/test_slack_uploads.py,
Discord: tests/discord/test_discord_messages.py), from the scripted backend answering with boxes (issue 24)."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console

from bot.core.config import Settings
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.front_end_helpers import final_event, terminal_chat, web_chat, web_form
from tests.pictures import png
from tests.scripted_backend import ScriptedBackend

ANSWER = "<p>a green square</p> {<25><25><75><75>}"


def _picture() -> bytes:
    return png((10, 10, 200), (40, 40))


async def _service(tmp_path: Path, backend: ScriptedBackend | None = None) -> tuple[BotService, Database]:
    db = Database(sqlite_url(tmp_path / "front.db"))
    await db.create_all()
    settings = Settings.model_validate({"model": {"variant": "minigptv2"}, "grounding": {"long_side": 400}})
    return BotService(settings, db, backend or ScriptedBackend(ANSWER, piece=7)), db


def test_grounding_web_final_event_carries_the_annotated_picture(tmp_path: Path) -> None:
    async def main() -> dict[str, Any]:
        service, db = await _service(tmp_path)
        async with web_chat(service, db) as client:
            form = web_form("t-boxes", "/detection squares", "e1", _picture(), "squares.png")
            response = await client.post("/api/messages", data=form)
            return final_event(await response.text())

    final = asyncio.run(main())
    assert final["text"] == "**a green square**"
    (file,) = final["files"]
    assert (file["filename"], file["mime"]) == ("boxes.png", "image/png")  # a picture: shown inline
    image = Image.open(io.BytesIO(base64.b64decode(file["data"]))).convert("RGB")
    assert image.size == (400, 400)
    assert image.getpixel((100, 200)) == (255, 0, 0) and image.getpixel((200, 200)) == (10, 10, 200)


def _terminal(tmp_path: Path, console: Console) -> str:
    """The terminal chat asking ``/detection squares`` with a picture; what it printed."""
    picture = tmp_path / "squares.png"
    picture.write_bytes(_picture())

    async def main() -> None:
        service, db = await _service(tmp_path)
        await terminal_chat(service, db, console, tmp_path / "files", f"/image {picture} /detection squares")

    asyncio.run(main())
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def test_grounding_terminal_saves_the_annotated_picture_and_prints_its_path(tmp_path: Path) -> None:
    """On a pipe (or file) the phrase is plain words: no asterisks, no escape codes (issue 24 follow-up)."""
    output = _terminal(tmp_path, Console(file=io.StringIO(), width=300))
    (saved,) = [p for p in (tmp_path / "files").rglob("*") if p.is_file()]
    assert saved.name.endswith("boxes.png") and str(saved) in output
    assert Image.open(saved).size == (400, 400)
    final = output.split("bot>")[-1].split("saved")[0]  # the cleaned text printed after the streamed raw one
    assert final.strip() == "a green square" and "\x1b" not in output


def test_grounding_terminal_shows_the_phrase_bold_on_a_terminal(tmp_path: Path) -> None:
    output = _terminal(tmp_path, Console(file=io.StringIO(), width=300, force_terminal=True, color_system="standard"))
    final = output.split("bot>")[-1]
    assert "\x1b[1ma green square\x1b[0m" in final and "**" not in final and "{<" not in final


def test_grounding_web_history_shows_answers_as_shown_and_the_model_reads_them_raw(tmp_path: Path) -> None:
    """Issue 24 follow-up: the stored answer stays raw (a follow-up sends the model its own boxes, as the
    reference does), but the history a reloaded page shows is the cleaned text."""
    backend = ScriptedBackend(ANSWER, piece=7)
    backend.script = [ANSWER, "It is green."]

    async def main() -> list[dict[str, Any]]:
        service, db = await _service(tmp_path, backend)
        first = web_form("t-boxes", "/detection squares", "e1", _picture(), "squares.png")
        async with web_chat(service, db) as client:
            for form in (first, web_form("t-boxes", "and?", "e2")):
                response = await client.post("/api/messages", data=form)
                assert response.status == 200 and "event: final" in await response.text()
            history = await (await client.get("/api/threads/t-boxes")).json()
        return history["turns"]

    turns = asyncio.run(main())
    answers = [t["text"] for t in turns if t["role"] == "assistant"]
    assert answers == ["**a green square**", "It is green."]
    follow_up = backend.calls[1]["turns"]
    assert [t["text"] for t in follow_up if t["role"] == "assistant"] == [ANSWER]  # the model reads its raw answer
