"""The attachment download policy every chat platform shares: one cap, one set of checks, one refusal type.

A chat front end (Slack, Discord, the next one) subclasses :class:`PictureDownloads` and supplies two
small methods: :meth:`~PictureDownloads.declared` (what the platform says about an attachment before a
byte is fetched) and :meth:`~PictureDownloads.fetch` (the platform's own download, raising
:class:`Refused` with a user-facing sentence when it fails).  Everything else lives here, once:

- the size cap: the platform's ``max_image_bytes`` setting can only *lower* the core's
  :attr:`~bot.core.frontend_api.ImageLimits.max_bytes`, never raise it (:func:`size_cap`);
- the checks made before downloading: a declared type that is not a picture, a declared size over the
  cap, declared dimensions over the core's pixel limit (:func:`check_declared`);
- the cap enforced while streaming (:func:`read_capped`) and after a download;
- the shape of the result: the pictures, or — at the first one that cannot be fetched — that one alone
  as an :class:`~bot.core.requests.ImageAttachment` with ``error`` set, which the core answers after
  dropping a redelivered event (so a retried message is never answered twice); nothing at all is
  downloaded when there are more pictures than the core reads in one message.
"""

from __future__ import annotations

import mimetypes
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from bot.core.frontend_api import ImageLimits
from bot.core.images import format_size
from bot.core.requests import ImageAttachment

__all__ = ["Declared", "PictureDownloads", "Refused", "check_declared", "guess_mime", "read_capped", "size_cap"]

Item = TypeVar("Item")


class Refused(Exception):
    """A picture the front end will not hand to the core; ``user_message`` says why, in the user's terms."""

    def __init__(self, user_message: str) -> None:
        super().__init__(user_message)
        self.user_message = user_message


@dataclass(frozen=True)
class Declared:
    """What a platform tells about an attachment before it is fetched (0 = not told)."""

    name: str
    mime: str = ""
    size: int = 0
    width: int = 0
    height: int = 0


def size_cap(setting: int, limits: ImageLimits) -> int:
    """The most bytes downloaded per picture: a platform's ``max_image_bytes`` (0 = unset) may only lower
    the core's limit — the core would refuse a larger picture anyway, after a wasted download."""
    return min(setting, limits.max_bytes) if setting > 0 else limits.max_bytes


def too_big(name: str, cap: int) -> str:
    return f"{name} is larger than {format_size(cap)}, the most I accept; please send a smaller picture."


def check_declared(file: Declared, cap: int, limits: ImageLimits) -> None:
    """Refuse what the platform's own description already rules out, so no byte of it is fetched."""
    if file.mime and not file.mime.startswith("image/"):
        raise Refused(f"{file.name} is not a picture ({file.mime}); I read {limits.formats_text('and')}.")
    if file.size > cap:
        raise Refused(too_big(file.name, cap))
    if file.width and file.height and file.width * file.height > limits.max_pixels:
        raise Refused(
            f"{file.name} has {file.width}×{file.height} pixels, more than I read "
            f"({limits.max_pixels:,} at most); please send a smaller picture."
        )


async def read_capped(chunks: AsyncIterable[bytes], cap: int, name: str) -> bytes:
    """A streamed body, stopped as soon as it passes ``cap`` (a declared size may lie)."""
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > cap:
            raise Refused(too_big(name, cap))
    return bytes(data)


def guess_mime(content_type: str | None, filename: str | None) -> str:
    """A content type without parameters, lower-cased; guessed from the file name when the platform sent none."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    return mime or (mimetypes.guess_type(filename or "")[0] or "")


class PictureDownloads(Generic[Item]):
    """Downloads a message's attachments: ``limits`` (read per message) come from the core, ``max_bytes``
    (the platform's ``max_image_bytes``, 0 = the core's limit) may lower the size cap, never raise it."""

    def __init__(self, limits: Callable[[], ImageLimits], max_bytes: int = 0) -> None:
        self.limits, self.max_bytes = limits, max_bytes

    def declared(self, item: Item) -> Declared:
        """What the platform says about ``item`` (name, type, size, dimensions)."""
        raise NotImplementedError

    async def fetch(self, item: Item, file: Declared, cap: int) -> bytes:
        """The bytes of ``item`` (at most about ``cap``), or :class:`Refused` with a user-facing reason."""
        raise NotImplementedError

    async def download(self, items: Sequence[Item]) -> tuple[ImageAttachment, ...]:
        """The pictures, or — at the first one that cannot be fetched — that one alone, with its ``error``."""
        limits = self.limits()
        files = [self.declared(item) for item in items]
        if len(files) > limits.max_per_message:
            # Nothing is downloaded: the core refuses the message for the count of pictures alone.
            return tuple(ImageAttachment(b"", filename=f.name, mime=f.mime) for f in files)
        cap = size_cap(self.max_bytes, limits)
        pictures = []
        for item, file in zip(items, files, strict=True):
            try:
                check_declared(file, cap, limits)
                data = await self.fetch(item, file, cap)
                if len(data) > cap:
                    raise Refused(too_big(file.name, cap))
            except Refused as exc:
                return (ImageAttachment(b"", filename=file.name, mime=file.mime, error=exc.user_message),)
            pictures.append(ImageAttachment(data, filename=file.name, mime=file.mime))
        return tuple(pictures)
