"""Website previews in Slack: the screenshot and the page go into the answer's thread with files_upload_v2."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from slack_helpers import CHANNEL, Env, FakeSlack, in_slack, png_bytes, slack_env

from adapters.slack.messages import escape_mrkdwn, missing_files_write
from bot.core.requests import ReplyFile
from tests.scripted_backend import ScriptedBackend

PAGE = "<!doctype html><html><body><div style='width:90px;height:60px;background:#0a0'></div></body></html>"
ANSWER = "Here is your page:\n```html\n" + PAGE + "\n```"


def _minigptv2(tmp_path: Path, answer: str) -> contextlib.AbstractAsyncContextManager[Env]:
    """Slack on a MiniGPT-v2 bot whose backend answers ``answer`` (boxes included)."""
    return slack_env(tmp_path, backend=ScriptedBackend(answer, piece=9), model={"variant": "minigptv2"})


def test_render_slack_uploads_preview_and_page_into_the_thread(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        root = await fake.ask(png_bytes(), "website")
        shared = await fake.wait_for(lambda: len(fake.shared_files(CHANNEL, root)) == 2 and fake.shared_files(
            CHANNEL, root))  # fmt: skip
        assert [u["filename"] for u in shared] == ["website.png", "website.html"]
        assert shared[0]["data"].startswith(b"\x89PNG") and shared[1]["data"].decode() == PAGE
        assert all(u["thread_ts"] == root for u in shared)  # in the answer's thread, not the channel
        (answer,) = fake.bot_replies(CHANNEL, root)
        assert answer.text == escape_mrkdwn(ANSWER)  # the text answer stays as it was streamed

    in_slack(main, tmp_path, backend=ScriptedBackend(ANSWER, piece=40))


def test_render_slack_without_files_write_says_so_in_the_thread(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        fake.scopes.discard("files:write")
        root = await fake.ask(png_bytes(), "website")
        files = [
            ReplyFile("website.png", "image/png", b"", title="Preview (rendered without scripts or network access)"),
            ReplyFile("website.html", "text/html", b"", title="The page as an HTML file"),
        ]
        note = escape_mrkdwn(missing_files_write(files))
        replies = await fake.wait_for(lambda: [m for m in fake.bot_replies(CHANNEL, root) if m.text == note])
        assert len(replies) == 1 and fake.shared_files(CHANNEL, root) == []
        texts = [m.text for m in fake.bot_replies(CHANNEL, root)]
        assert texts == [escape_mrkdwn(ANSWER), note]  # the answer, then the note; nothing lost

    in_slack(main, tmp_path, backend=ScriptedBackend(ANSWER, piece=40))


def test_grounding_slack_uploads_the_annotated_picture_into_the_thread(tmp_path: Path) -> None:
    """MiniGPT-v2's boxes (issue 24): the picture with them drawn goes into the thread, the answer loses the tokens."""
    answer = "<p>a sofa</p> {<10><20><60><80>}"

    async def main() -> None:
        async with _minigptv2(tmp_path, answer) as env:
            fake = env.fake
            root = await fake.ask(png_bytes(), "/detection sofas")
            (shared,) = await fake.wait_for(lambda: fake.shared_files(CHANNEL, root))
            assert shared["filename"] == "boxes.png" and shared["thread_ts"] == root
            assert shared["data"].startswith(b"\x89PNG")
            (reply,) = await fake.wait_for(lambda: [m for m in fake.bot_replies(CHANNEL, root) if "{<" not in m.text])
            assert reply.text == "*a sofa*"  # Slack's bold; the streamed raw tokens replaced by the final text
            assert env.backend.calls[-1]["turns"][-1]["text"] == "[detection] sofas"

    asyncio.run(main())


def test_grounding_slack_without_files_write_names_the_boxes_picture(tmp_path: Path) -> None:
    """Issue 24: without files:write the note says the boxes picture could not be attached, not a preview."""
    answer = "<p>a <b>sofa</b></p> {<10><20><60><80>}"

    async def main() -> None:
        async with _minigptv2(tmp_path, answer) as env:
            fake = env.fake
            fake.scopes.discard("files:write")
            root = await fake.ask(png_bytes(), "/detection sofas")
            replies = await fake.wait_for(lambda: len(fake.bot_replies(CHANNEL, root)) == 2 and fake.bot_replies(
                CHANNEL, root))  # fmt: skip
            assert [m.text for m in replies] == [
                "*a &lt;b&gt;sofa&lt;/b&gt;*",
                "I couldn't attach “The boxes on your picture” (boxes.png): this Slack app lacks the files:write "
                "scope. Ask a workspace admin to add it (OAuth &amp; Permissions → Bot Token Scopes) and reinstall "
                "the app.",
            ]
            assert fake.shared_files(CHANNEL, root) == []

    asyncio.run(main())
