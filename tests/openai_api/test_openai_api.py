"""The OpenAI-compatible API with the real ``openai`` client against the running aiohttp server on loopback,
a real BotService on SQLite and the scripted backend: models, pictures, streaming, the stored thread a
stateless conversation continues, OpenAI-shaped errors with their status codes, exact quotas, keys."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai_helpers import assistant, data_url, png, running_api, user

from bot.core.requests import ThreadRef
from model.engine.contract import Busy, RequestFailed
from storage.api_keys import split_api_key
from tests.scripted_backend import ScriptedBackend


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_models_list_and_one_model(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_api(tmp_path, ScriptedBackend()) as api:
            client = api.client()
            models = [m async for m in client.models.list()]
            ids = [m.id for m in models]
            assert ids[0] == "minigpt4" and "minigpt4:recipe" in ids and "minigpt4:website" in ids
            one = await client.models.retrieve("minigpt4")
            facts = one.model_dump()
            assert facts["variant"] == "vicuna0" and facts["max_model_len"] == 2000 and facts["object"] == "model"
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("gpt-4o")
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="gpt-4o", messages=[user("hi", data_url(png()))])

    run(main())


def test_a_picture_as_a_data_url_is_answered_and_stored(tmp_path: Path) -> None:
    async def main() -> None:
        backend = ScriptedBackend("A red square on white.")
        async with running_api(tmp_path, backend) as api:
            picture = png()
            reply = await api.client().chat.completions.create(
                model="minigpt4", messages=[user("What is this?", data_url(picture))], max_tokens=5, temperature=0
            )
            assert reply.object == "chat.completion" and reply.choices[0].message.content == "A red square on white."
            assert reply.choices[0].finish_reason == "stop" and reply.model == "minigpt4"
            assert reply.usage.prompt_tokens == 10 and reply.usage.completion_tokens == 5
            assert reply.usage.total_tokens == 15 and reply.usage.prompt_tokens_details.cached_tokens == 0
            call = backend.calls[-1]
            assert call["images"] == [picture] and call["user"] == "alice"
            assert call["options"]["max_new_tokens"] == 5 and call["options"]["do_sample"] is False
            rows = await api.db.list_conversations(platform="openai")
            assert len(rows) == 1 and rows[0][0].workspace == "acme" and rows[0][0].channel.startswith("key-")
            usage = await api.db.usage_since("openai", "acme", "alice", api.db.now() - timedelta(days=1))
            assert (usage.requests, usage.images, usage.tokens) == (1, 1, 5)

    run(main())


def test_streaming_with_usage_ends_with_a_usage_chunk(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_api(tmp_path, ScriptedBackend("one two three four")) as api:
            stream = await api.client().chat.completions.create(
                model="minigpt4", messages=[user("count", data_url(png()))], stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = [c async for c in stream]
            assert all(c.object == "chat.completion.chunk" for c in chunks)
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "one two three four"
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
            assert all(c.usage is None for c in chunks[:-1])

            plain = await api.client().chat.completions.create(
                model="minigpt4", messages=[user("count", data_url(png((1, 2, 3))))], stream=True
            )
            assert all(c.usage is None and c.choices for c in [c async for c in plain])

    run(main())


def test_a_conversation_is_one_stored_thread_and_an_edit_starts_it_over(tmp_path: Path) -> None:
    async def main() -> None:
        backend = ScriptedBackend()
        backend.script = ["First answer.", "Second answer.", "Third answer.", "Edited answer.", "Other.", "Named."]
        async with running_api(tmp_path, backend) as api:
            chat = api.client().chat.completions
            picture = data_url(png())
            opening = user("What is it?", picture)
            first = await chat.create(model="minigpt4", messages=[{"role": "system", "content": "Be brief."}, opening])
            answer = first.choices[0].message.content
            second = await chat.create(model="minigpt4", messages=[
                {"role": "system", "content": "Be brief. Today is Monday."}, opening, assistant(answer),
                user("And the colour?"),
            ])  # fmt: skip
            assert second.choices[0].message.content == "Second answer."
            assert backend.calls[1]["conversation_id"] == backend.calls[0]["conversation_id"]
            assert backend.calls[1]["images"] == [png()]  # the stored picture, not a second copy
            assert [t["role"] for t in backend.calls[1]["turns"]] == ["user", "assistant", "user"]
            third = await chat.create(
                model="minigpt4",
                messages=[
                    opening,
                    assistant(answer),
                    user("And the colour?"),
                    assistant("Second answer."),
                    user("Size?"),
                ],
            )
            assert third.choices[0].message.content == "Third answer."
            assert backend.calls[2]["conversation_id"] == backend.calls[0]["conversation_id"]
            assert len(await api.db.list_conversations(platform="openai")) == 1

            # Regenerated: the client's history differs from the stored one → a new thread (the next free slot of
            # this opening) starts, seeded with it; the first stays as it was.
            await chat.create(model="minigpt4", messages=[opening, assistant("A different answer."), user("Why?")])
            edited = backend.calls[3]
            assert edited["conversation_id"] != backend.calls[0]["conversation_id"]
            assert [(t["role"], t["text"]) for t in edited["turns"]][1:] == [
                ("assistant", "A different answer."),
                ("user", "Why?"),
            ]
            conversations = await api.db.list_conversations(platform="openai")
            assert len(conversations) == 2 and all(c.archived_at is None for c, _n in conversations)

            # The same opening again is a new conversation in a slot of its own; the others stay live.
            await chat.create(model="minigpt4", messages=[opening])
            assert backend.calls[4]["conversation_id"] not in {c["conversation_id"] for c in backend.calls[:4]}
            live = [c for c, _n in await api.db.list_conversations(platform="openai") if c.archived_at is None]
            assert len(live) == 3

            # An explicit conversation id names the thread, whatever the opening.
            await chat.create(model="minigpt4", messages=[user("hello", picture)], metadata={"conversation_id": "x"})
            named = await chat.create(model="minigpt4", metadata={"conversation_id": "x"}, messages=[
                user("hello", picture), assistant("Named."), user("more")])  # fmt: skip
            assert named.choices[0].message.content == "A red circle."
            assert backend.calls[6]["conversation_id"] == backend.calls[5]["conversation_id"]

    run(main())


def test_presets_by_model_id_and_by_first_word(tmp_path: Path) -> None:
    async def main() -> None:
        page = "```html\n<html><body><h1>Shop</h1></body></html>\n```"
        backend = ScriptedBackend(page)
        async with running_api(tmp_path, backend) as api:
            prompts = {p.name: p.prompt for p in api.service.presets()}
            chat = api.client().chat.completions
            reply = await chat.create(model="minigpt4:website", messages=[user("", data_url(png()))])
            assert backend.calls[-1]["turns"][-1]["text"] == prompts["website"]
            assert "<h1>Shop</h1>" in reply.choices[0].message.content  # the page comes back in the text
            follow = [user("", data_url(png())), assistant(reply.choices[0].message.content), user("smaller")]
            await chat.create(model="minigpt4:website", messages=follow)
            assert backend.calls[-1]["conversation_id"] == backend.calls[0]["conversation_id"]
            assert backend.calls[-1]["turns"][-1]["text"] == "smaller"  # follow-ups are asked as written
            await chat.create(model="minigpt4", messages=[user("/recipe vegan please", data_url(png((9, 9, 9))))])
            assert backend.calls[-1]["turns"][-1]["text"] == prompts["recipe"] + " vegan please"

    run(main())


def _error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_errors_have_openai_shape_and_status(tmp_path: Path) -> None:
    async def main() -> None:
        backend = ScriptedBackend()
        async with running_api(tmp_path, backend, settings={"images": {"max_per_message": 2}}) as api:
            chat = api.client().chat.completions
            html = data_url(b"<!DOCTYPE html><html><body>Sign in</body></html>", "image/png")
            with pytest.raises(openai.BadRequestError) as bad:
                await chat.create(model="minigpt4", messages=[user("what?", html)])
            assert "picture" in _error_of(bad.value)["message"].lower()
            many = [data_url(png((i, 0, 0))) for i in range(3)]
            with pytest.raises(openai.BadRequestError) as bad:
                await chat.create(model="minigpt4", messages=[user("what?", *many)])
            assert "at most 2 pictures" in _error_of(bad.value)["message"]
            with pytest.raises(openai.BadRequestError) as bad:
                await chat.create(model="minigpt4", messages=[user("no picture")])
            with pytest.raises(openai.BadRequestError) as bad:
                await chat.create(model="minigpt4", messages=[user("x", data_url(png()))], n=2)
            assert _error_of(bad.value)["param"] == "n"
            with pytest.raises(openai.BadRequestError):
                await chat.create(model="minigpt4", messages=[user("x", data_url(png()))], temperature=7)
            with pytest.raises(openai.BadRequestError):
                await chat.create(model="minigpt4", messages=[user("x", data_url(png()))], max_tokens=10_000)
            with pytest.raises(openai.BadRequestError) as bad:
                await chat.create(model="minigpt4", messages=[user("x", "https://example.com/cat.png")])
            assert _error_of(bad.value)["code"] == "remote_images_disabled"
            backend.fail = RequestFailed("boom")  # not reached: nothing above was sent to the model
            assert backend.calls == []

            # 503 for Busy, with Retry-After; the SDK's own retry honours it (here: refused at once).
            backend.fail = Busy("queue full", 3.0)
            with pytest.raises(openai.InternalServerError) as busy:
                await chat.create(model="minigpt4", messages=[user("x", data_url(png()))])
            assert busy.value.status_code == 503 and busy.value.response.headers["Retry-After"] == "3"
            assert _error_of(busy.value)["code"] == "busy"
            backend.fail = RequestFailed("the model broke")
            with pytest.raises(openai.InternalServerError) as failed:
                await chat.create(model="minigpt4", messages=[user("x", data_url(png()))], stream=True)
            assert failed.value.status_code == 503
            backend.fail = None

            # 403: an access rule.
            await api.db.add_rule("deny", "user", "openai", "alice")
            api.service._access.invalidate()
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await chat.create(model="minigpt4", messages=[user("x", data_url(png()))])
            assert _error_of(denied.value)["type"] == "permission_error"
            await api.db.remove_rule("deny", "user", "openai", "alice")
            api.service._access.invalidate()

            # 429: a quota, with the seconds until it resets.
            await api.db.set_quota("user", "openai", "acme", "alice", requests_per_day=1)
            await chat.create(model="minigpt4", messages=[user("x", data_url(png()))])
            with pytest.raises(openai.RateLimitError) as limited:
                await chat.create(model="minigpt4", messages=[user("x", data_url(png()))])
            retry = int(limited.value.response.headers["Retry-After"])
            assert 1 <= retry <= 86400 and _error_of(limited.value)["type"] == "insufficient_quota"

    run(main())


def test_a_failure_mid_stream_is_an_error_chunk_then_done(tmp_path: Path) -> None:
    class FailsMidway(ScriptedBackend):
        async def stream(self, **kwargs: Any) -> Any:
            async for event in super().stream(**kwargs):
                yield event
                raise RequestFailed("the replica died")

    async def main() -> None:
        async with running_api(tmp_path, FailsMidway("one two three")) as api:
            stream = await api.client().chat.completions.create(
                model="minigpt4", messages=[user("x", data_url(png()))], stream=True
            )
            seen = []
            with pytest.raises(openai.APIError) as failed:
                async for chunk in stream:
                    seen.append(chunk)
            assert "went wrong" in str(failed.value) and seen[0].choices[0].delta.role == "assistant"
            async with aiohttp.ClientSession() as http:
                body = {"model": "minigpt4", "stream": True, "messages": [user("x", data_url(png((5, 5, 5))))]}
                response = await http.post(f"{api.url}/chat/completions", json=body,
                                           headers={"Authorization": f"Bearer {api.key}"})  # fmt: skip
                lines = [line for line in (await response.text()).split("\n") if line.startswith("data: ")]
            assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"

    run(main())


def test_a_quota_of_n_is_exact_under_simultaneous_requests(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_api(tmp_path, ScriptedBackend(delay=0.01)) as api:
            await api.db.set_quota("user", "openai", "acme", "alice", requests_per_day=5)
            client = api.client()

            async def one(i: int) -> int:
                try:
                    await client.chat.completions.create(
                        model="minigpt4", messages=[user("x", data_url(png((i, 1, 1))))]
                    )
                except openai.RateLimitError as exc:
                    assert exc.response.headers["Retry-After"]
                    return 429
                return 200

            statuses = await asyncio.gather(*(one(i) for i in range(12)))
            assert sorted(statuses) == [200] * 5 + [429] * 7
            usage = await api.db.usage_since("openai", "acme", "alice", api.db.now() - timedelta(days=1))
            assert usage.requests == 5

    run(main())


def test_keys_refused_and_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: Any) -> None:
    async def main() -> list[str]:
        async with running_api(tmp_path, ScriptedBackend()) as api:
            ok = await api.client().chat.completions.create(model="minigpt4", messages=[user("x", data_url(png()))])
            assert ok.choices[0].message.content
            wrong = api.key[:-4] + "abcd"
            with pytest.raises(openai.AuthenticationError) as refused:
                await api.client(wrong).models.list()
            assert _error_of(refused.value)["code"] == "invalid_api_key"
            revoked = await api.new_key("bob")
            bob = await api.db.verify_api_key("openai", revoked)
            await api.client(revoked).models.list()
            await api.db.revoke_api_key(bob.id)
            with pytest.raises(openai.AuthenticationError):
                await api.client(revoked).models.list()
            async with aiohttp.ClientSession() as http:
                for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}):
                    response = await http.get(f"{api.url}/models", headers=headers)
                    assert response.status == 401 and (await response.json())["error"]["code"] == "invalid_api_key"
            with pytest.raises(openai.BadRequestError):  # a bad request's log line names the key id only
                await api.client().chat.completions.create(model="minigpt4", messages=[user("x")], n=3)
            return [api.key, wrong, revoked]

    caplog.set_level(logging.DEBUG)
    keys = run(main())
    captured = capfd.readouterr()
    text = "\n".join(f"{r.getMessage()} {r.args}" for r in caplog.records) + captured.out + captured.err
    assert "bad request from key" in text  # the logging ran
    for key in keys:
        assert key not in text and (split_api_key(key) or ("", key))[1] not in text


def test_the_conversation_store_is_platform_openai(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_api(tmp_path, ScriptedBackend()) as api:
            await api.client().chat.completions.create(model="minigpt4", messages=[user("x", data_url(png()))])
            conversation, _count = (await api.db.list_conversations(platform="openai"))[0]
            key = ThreadRef("openai", conversation.workspace, conversation.channel, conversation.thread)
            assert (await api.db.live_conversation(key)).id == conversation.id

    run(main())


def test_grounding_boxes_come_back_cleaned_streamed_or_not_and_the_follow_up_continues(tmp_path: Path) -> None:
    """Issue 24: an answer with boxes reaches an API client cleaned (phrases in **bold**, no ``{<..>}`` tokens;
    chat completions has no image output, so boxes.png is not sent) — streamed too, where nothing sent can be
    taken back: the stream holds the text from the first token until the final text.  The client's copy
    matches the stored thread (history gives answers as shown), so a follow-up continues it and the model
    reads its raw boxes back."""
    boxes = "There is <p>a red square</p> {<10><20><40><60>} on <p>the floor</p> {<0><50><100><100>}."
    cleaned = "There is **a red square** on **the floor**."

    async def main() -> None:
        backend = ScriptedBackend(boxes, piece=5)
        backend.script = [boxes, boxes, "It is red."]
        async with running_api(tmp_path, backend) as api:
            chat = api.client().chat.completions
            opening = user("Where are they?", data_url(png()))
            whole = await chat.create(model="minigpt4", messages=[opening])
            assert whole.choices[0].message.content == cleaned

            stream = await chat.create(model="minigpt4", messages=[user("where?", data_url(png()))], stream=True)
            pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
            assert pieces == ["There", " is", " **a red square** on **the floor**."]  # streamed up to the first token

            follow = await chat.create(model="minigpt4", messages=[opening, assistant(cleaned), user("Colour?")])
            assert follow.choices[0].message.content == "It is red."
            assert backend.calls[2]["conversation_id"] == backend.calls[0]["conversation_id"]
            assert [(t["role"], t["text"]) for t in backend.calls[2]["turns"]][1:] == [
                ("assistant", boxes), ("user", "Colour?")
            ]  # fmt: skip

    run(main())
