"""The terminal front end over a real chat session on demo weights."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from rich.console import Console

from adapters.terminal import TerminalChat
from model import load_minigpt4
from model.chat import ChatSession
from model.demo_weights import write_demo_weights


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    demo = write_demo_weights(tmp_path_factory.mktemp("demo"), "vicuna0")
    return load_minigpt4(**demo.loader_kwargs())


def _run(session: ChatSession, lines: list[str]) -> str:
    buffer = io.StringIO()
    feed = iter(lines)

    def read_line(_prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    TerminalChat(session, Console(file=buffer, width=200), read_line).run()
    return buffer.getvalue()


def test_image_question_follow_up_and_reset(demo_model, tmp_path):
    picture = tmp_path / "dish.png"
    Image.new("RGB", (64, 48), (250, 120, 0)).save(picture)
    second = tmp_path / "second.jpg"
    Image.new("RGB", (30, 60), (0, 0, 200)).save(second)
    session = ChatSession(demo_model, demo_model.default_options(do_sample=False, max_new_tokens=4))
    output = _run(
        session,
        [
            "what is this?",  # no image yet
            f"/image {picture} What can I cook with this?",
            "And for dessert?",
            f"/image {second}",
            "Compare both pictures.",
        ],
    )
    assert "Attach a picture first" in output
    assert "Got second.jpg" in output
    assert output.count("bot> ") == 3
    assert len(session.images) == 2
    prompt = session.last.prompt
    assert prompt.count("<ImageHere>") == 2
    assert "What can I cook with this?" in prompt and "And for dessert?" in prompt
    assert prompt.endswith("###Human: <Img><ImageHere></Img> Compare both pictures.###Assistant: ")

    _run(session, ["/reset"])
    assert session.turns == [] and session.images == []


def test_bad_files_keep_the_chat_alive(demo_model, tmp_path):
    html = tmp_path / "page.png"
    html.write_bytes(b"<html><body>login</body></html>")
    truncated = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.new("RGB", (50, 50), (1, 2, 3)).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    good = tmp_path / "ok.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(good)
    session = ChatSession(demo_model, demo_model.default_options(do_sample=False, max_new_tokens=3))
    output = _run(
        session,
        [f"/image {html}", f"/image {truncated}", f"/image {tmp_path / 'missing.png'}", "/bogus", f"/image {good} hi"],
    )
    assert "page.png is not a picture I can read" in output
    assert "cut.png is not a picture I can read" in output
    assert "No such file" in output
    assert "Unknown command '/bogus'" in output
    assert output.count("bot> ") == 1
    assert len(session.images) == 1
