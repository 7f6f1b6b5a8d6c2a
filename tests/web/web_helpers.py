"""Shared pieces of the web front-end tests (imported as ``web_helpers``: pytest puts this folder on sys.path)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

from bot.core.config import Settings
from model import load_minigpt4
from model.demo_weights import write_demo_weights
from model.engine import Engine

# Small answers, greedy (deterministic), small image limits so the upload limit is cheap to exceed.
BASE_SETTINGS: dict[str, Any] = {
    "generation": {"max_new_tokens": 6, "do_sample": False},
    "images": {"max_bytes": 256 * 1024, "max_per_message": 2, "max_pixels": 4_000_000},
}


def make_settings(**overrides: Any) -> Settings:
    data = json.loads(json.dumps(BASE_SETTINGS))
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return Settings.model_validate(data)


def start_demo_engine(folder: Path) -> Engine:
    """A running engine over tiny random vicuna0 demo weights (the caller stops it)."""
    weights = write_demo_weights(folder, "vicuna0")
    return Engine(load_minigpt4(**weights.loader_kwargs())).start()


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(size: tuple[int, int] = (96, 96)) -> bytes:
    """A JPEG with detail (noise), so cutting it short really truncates the scan data."""
    buffer = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width``×``height`` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def parse_sse(body: str) -> list[tuple[str, dict[str, Any]]]:
    """``event:``/``data:`` blocks → [(event, json data)], in order."""
    events: list[tuple[str, dict[str, Any]]] = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        events.append((name, json.loads("\n".join(data)) if data else {}))
    return events
