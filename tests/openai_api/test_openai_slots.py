"""The slots that map stateless conversations onto stored threads (``adapters/openai_api/chat.py``
:func:`place`): conversations opening with the same message share 8 slots; a ninth takes the least recently
used one (its stored conversation archived), and the evicted conversation, when it comes back, is re-seeded
from the client's copy — its answer sees its whole history — evicting the next least recently used."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from openai_helpers import Api, assistant, data_url, png, running_api, user

from adapters.openai_api.chat import SLOTS
from tests.scripted_backend import ScriptedBackend

OPENING = user("What is it?", data_url(png()))


def edited(i: int) -> list[dict[str, Any]]:
    """Conversation ``i``: the shared opening, an answer of the client's own, and its question."""
    return [OPENING, assistant(f"Answer {i}."), user(f"Question {i}?")]


async def live_ids(api: Api) -> set[str]:
    return {str(c.id) for c, _n in await api.db.list_conversations(platform="openai") if c.archived_at is None}


def test_the_least_recently_used_slot_is_evicted_and_its_conversation_reseeded(tmp_path: Path) -> None:
    async def main() -> None:
        backend = ScriptedBackend("A red circle.")
        async with running_api(tmp_path, backend) as api:
            chat = api.client().chat.completions
            for i in range(SLOTS):  # eight conversations fill the eight slots, each seeded
                await chat.create(model="minigpt4", messages=edited(i))
            stored = [call["conversation_id"] for call in backend.calls]
            assert len(set(stored)) == SLOTS and await live_ids(api) == set(stored)

            # Conversation 0 goes on (its slot is now the most recently used); 1 is the least recently used.
            await chat.create(model="minigpt4", messages=[*edited(0), assistant("A red circle."), user("More?")])
            assert backend.calls[-1]["conversation_id"] == stored[0] and len(backend.calls[-1]["turns"]) == 5

            await chat.create(model="minigpt4", messages=edited(SLOTS))  # a ninth: conversation 1 is evicted
            assert stored[1] not in await live_ids(api) and stored[0] in await live_ids(api)
            assert len(await live_ids(api)) == SLOTS

            # Conversation 1 comes back: re-seeded from the client's copy, so the model sees all of it, in the
            # slot of the next least recently used (2), which is archived in turn.
            again = [*edited(1), assistant("A red circle."), user("And the colour?")]
            reply = await chat.create(model="minigpt4", messages=again)
            assert reply.choices[0].message.content == "A red circle."
            turns = [(t["role"], t["text"]) for t in backend.calls[-1]["turns"]]
            assert turns[1:] == [("assistant", "Answer 1."), ("user", "Question 1?"),
                                 ("assistant", "A red circle."), ("user", "And the colour?")]  # fmt: skip
            assert stored[2] not in await live_ids(api) and backend.calls[-1]["conversation_id"] not in stored

    asyncio.run(main())
