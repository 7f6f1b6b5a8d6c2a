"""Conversation templates and answer clean-up, byte-exact with the reference.

Reference: ``minigpt4/conversation/conversation.py`` (``Conversation.get_prompt`` with
``SeparatorStyle.SINGLE``, ``CONV_VISION_Vicuna0``, ``CONV_VISION_LLama2``,
``CONV_VISION_minigptv2``, ``Chat.ask`` / ``Chat.upload_img`` / ``Chat.answer``).

A prompt is ``system + sep`` followed by ``role + message + sep`` for every finished
message and a bare ``role`` for the open assistant slot.  An image is the message
``<Img><ImageHere></Img>``; a question asked right after it is joined with one space,
exactly as ``Chat.ask`` does, so the text the model sees is the text it was trained on.

A turn is :class:`~model.engine.contract.ChatTurn`, the mapping ``{"role", "text", "image"}`` the backend
seam carries: one type for a turn the model sees, whether it comes from the bot core or a ``ChatSession``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model.engine.contract import ChatTurn

__all__ = [
    "IMAGE_MESSAGE",
    "IMAGE_PLACEHOLDER",
    "TEMPLATES",
    "ConversationTemplate",
    "build_prompt",
    "checked_turn",
    "clean_answer",
]

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_MESSAGE = "<Img><ImageHere></Img>"

_SYSTEM_V0 = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)


@dataclass(frozen=True)
class ConversationTemplate:
    """One ``SeparatorStyle.SINGLE`` template: system text, (user, assistant) roles, separator."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str

    def render(self, messages: Sequence[tuple[str, str | None]]) -> str:
        """Render ``(role, message)`` pairs; a ``None``/empty message renders the bare role."""
        out = self.system + self.sep
        for role, message in messages:
            out += role + message + self.sep if message else role
        return out


TEMPLATES: dict[str, ConversationTemplate] = {
    "vicuna0": ConversationTemplate("vicuna0", _SYSTEM_V0, ("Human: ", "Assistant: "), "###"),
    "llama2": ConversationTemplate("llama2", _SYSTEM_V0, ("<s>[INST] ", " [/INST] "), ""),
    "minigptv2": ConversationTemplate("minigptv2", "", ("<s>[INST] ", " [/INST]"), ""),
}


def checked_turn(value: Mapping[str, Any]) -> ChatTurn:
    """A ``{"role", "text", "image"}`` mapping (the public contract: text may be missing or ``None``) as a
    complete :class:`ChatTurn`; refuses what no prompt may hold (``ValueError``), before any rendering."""
    role, text, image = str(value.get("role", "")), value.get("text") or "", bool(value.get("image"))
    if role not in ("user", "assistant"):
        raise ValueError(f"turn role must be 'user' or 'assistant', got {role!r}")
    if role == "assistant" and image:
        raise ValueError("an assistant turn cannot carry an image")
    if IMAGE_PLACEHOLDER in text:
        raise ValueError(f"turn text must not contain the reserved marker {IMAGE_PLACEHOLDER}")
    return ChatTurn(role="user" if role == "user" else "assistant", text=text, image=image)


def build_prompt(template: ConversationTemplate, turns: Sequence[ChatTurn | Mapping[str, Any]]) -> str:
    """Build the prompt the reference ``Chat`` would send for these turns.

    User turns with an image become ``<Img><ImageHere></Img>`` followed by the question
    after one space (``Chat.upload_img`` then ``Chat.ask``); an open assistant slot is
    appended unless the last turn already is an empty assistant turn.
    """
    user_role, assistant_role = template.roles
    messages: list[tuple[str, str | None]] = []
    checked = [checked_turn(t) for t in turns]
    for turn in checked:
        text, image = turn["text"], turn.get("image", False)
        if turn["role"] == "user":
            last = messages[-1] if messages else None
            if not image and last and last[0] == user_role and (last[1] or "").endswith("</Img>"):
                # Chat.ask: a question right after an uploaded image joins its message with one space
                messages[-1] = (user_role, f"{last[1]} {text}")
                continue
            message = text
            if image:  # Chat.upload_img (+ Chat.ask when the turn carries a question)
                message = f"{IMAGE_MESSAGE} {text}" if text else IMAGE_MESSAGE
            messages.append((user_role, message))
        else:
            messages.append((assistant_role, text or None))
    if not checked or checked[-1]["role"] != "assistant" or checked[-1]["text"]:
        messages.append((assistant_role, None))
    return template.render(messages)


def clean_answer(text: str) -> str:
    """The reference's post-processing of a decoded answer (``Chat.answer``).

    Cut at the first ``###`` (Vicuna's turn separator), keep what follows the last
    ``Assistant:`` and strip whitespace.
    """
    return text.split("###")[0].split("Assistant:")[-1].strip()
