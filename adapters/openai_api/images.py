"""Pictures of an OpenAI-style request: ``data:`` URLs, and ``http(s)`` URLs fetched without SSRF.

A remote picture is fetched only when ``[openai] fetch_remote_images`` is on, with the core's size limit
(the pixel limit and the format are checked by the core, as for every platform), a timeout, at most
``max_redirects`` redirects, no proxy from the environment, and — on every hop — only to public addresses:
a literal IP is checked before connecting, a name is checked by the connector's resolver on the very
addresses it then connects to (so a name that re-resolves to 127.0.0.1 between a check and the connection
cannot slip through).  Loopback, private, link-local (169.254.169.254, the cloud metadata address),
shared, reserved and multicast addresses are refused, also as IPv4-mapped IPv6.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from bot.core.images import format_size
from bot.core.requests import ImageAttachment

__all__ = ["AddressPolicy", "ImagePart", "RemoteImages", "decode_data_url", "is_public_address"]

log = logging.getLogger(__name__)

AddressPolicy = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]
"""Whether the bot may connect to an address to fetch a picture."""

REDIRECTS = frozenset({301, 302, 303, 307, 308})


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The production policy: globally routable unicast only (IPv4-mapped IPv6 judged as the IPv4 it maps)."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_global and not address.is_multicast


class BlockedAddress(OSError):
    """A picture URL that leads to an address the policy refuses."""


@dataclass(frozen=True)
class ImagePart:
    """One ``image_url`` part: its URL, the bytes of a ``data:`` URL (``None`` for a remote one until
    fetched), and a digest matching the stored picture's SHA-256 (remote: the URL's, until fetched)."""

    url: str
    data: bytes | None
    error: str | None = None

    @property
    def digest(self) -> str:
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        return "url:" + hashlib.sha256(self.url.encode("utf-8", "replace")).hexdigest()

    @property
    def remote(self) -> bool:
        return self.data is None and self.error is None


def decode_data_url(url: str, max_bytes: int) -> ImagePart:
    """A ``data:[<mime>][;base64],<data>`` URL's bytes, or an :class:`ImagePart` with a user-facing error."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        return ImagePart(url[:64], None, "A data: URL needs a comma before its data.")
    if len(payload) * 3 // 4 > max_bytes + 3:  # before decoding: no work for an oversized picture
        return ImagePart(url[:64], None, f"A picture is larger than {format_size(max_bytes)}.")
    try:
        if header.lower().endswith(";base64"):
            data = base64.b64decode(payload.strip(), validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        return ImagePart(url[:64], None, "A picture's data: URL is not valid base64.")
    if len(data) > max_bytes:
        return ImagePart(url[:64], None, f"A picture is larger than {format_size(max_bytes)}.")
    return ImagePart(url[:64] + "…", data)


class _GuardedResolver(AbstractResolver):
    """The default resolver, refusing a name any of whose addresses the policy refuses."""

    def __init__(self, allowed: AddressPolicy) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allowed = allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"].split("%")[0])
            if not self._allowed(address):
                raise BlockedAddress(f"{host} resolves to {address}, which pictures are not fetched from")
        return results

    async def close(self) -> None:
        await self._inner.close()


class RemoteImages:
    """Fetches ``http(s)`` pictures for requests (one session, made on first use, closed by :meth:`close`)."""

    def __init__(
        self, *, max_bytes: int, timeout_s: float, max_redirects: int, allowed: AddressPolicy = is_public_address
    ) -> None:
        self.max_bytes, self.timeout_s, self.max_redirects, self.allowed = max_bytes, timeout_s, max_redirects, allowed
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(resolver=_GuardedResolver(self.allowed), use_dns_cache=False)
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> ImageAttachment:
        """The picture at ``url``: its bytes, or ``ImageAttachment(error=…)`` saying why not (one log line)."""
        try:
            data = await asyncio.wait_for(self._fetch(URL(url)), self.timeout_s)
        except BlockedAddress as exc:
            return self._refused(url, str(exc), "That picture's address is not one I fetch from (a private or "
                                 "local network address).")  # fmt: skip
        except TimeoutError:
            return self._refused(url, "timed out", f"Fetching a picture took longer than {self.timeout_s:g} s.")
        except _TooLarge:
            return self._refused(url, "too large", f"A picture is larger than {format_size(self.max_bytes)}.")
        except _FetchError as exc:
            return self._refused(url, str(exc), f"I couldn't fetch a picture: {exc}.")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            blocked = _blocked_cause(exc)
            if blocked is not None:
                return self._refused(url, str(blocked), "That picture's address is not one I fetch from (a "
                                     "private or local network address).")  # fmt: skip
            return self._refused(url, f"{type(exc).__name__}: {exc}", "I couldn't fetch a picture from its URL.")
        return ImageAttachment(data=data, filename=url.rsplit("/", 1)[-1][:100])

    def _refused(self, url: str, detail: str, message: str) -> ImageAttachment:
        log.info("openai: picture %s not fetched: %s", url[:200], detail[:200])
        return ImageAttachment(data=b"", filename=url.rsplit("/", 1)[-1][:100], error=message)

    def _check(self, url: URL) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise _FetchError("only http and https picture URLs are fetched")
        try:
            address = ipaddress.ip_address(url.host.strip("[]").split("%")[0])
        except ValueError:
            return  # a name: the resolver checks what it resolves to
        if not self.allowed(address):
            raise BlockedAddress(f"{address} is not an address pictures are fetched from")

    async def _fetch(self, url: URL) -> bytes:
        for _hop in range(self.max_redirects + 1):
            self._check(url)
            async with self._client().get(url, allow_redirects=False, headers={"Accept": "image/*"}) as response:
                if response.status in REDIRECTS and "Location" in response.headers:
                    url = url.join(URL(response.headers["Location"]))
                    continue
                if response.status != 200:
                    raise _FetchError(f"the server answered {response.status}")
                if (response.content_length or 0) > self.max_bytes:
                    raise _TooLarge()
                return await _read_capped(response, self.max_bytes)
        raise _FetchError(f"more than {self.max_redirects} redirects")


class _FetchError(Exception):
    pass


class _TooLarge(Exception):
    pass


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def _blocked_cause(exc: BaseException) -> BlockedAddress | None:
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, BlockedAddress):
            return error
        stack += [error.__cause__, error.__context__, getattr(error, "os_error", None)]
    return None
