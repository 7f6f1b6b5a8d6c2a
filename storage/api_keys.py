"""API keys: secrets that stand for one user of one workspace on an HTTP API platform (``openai``)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import select, update

from storage.base import Store, as_utc
from storage.tables import ApiKey

__all__ = ["API_KEY_PREFIX", "ApiKeyStore", "split_api_key"]

API_KEY_PREFIX = "sk-mgb-"
"""How every API key starts (``sk-`` as tools expect of OpenAI-style keys; ``mgb`` names the bot, so a key
found in a file or a log says whose it is).  Then the key's public id (12 hex digits), ``-`` and the secret."""
_API_KEY_RE = re.compile(rf"^{re.escape(API_KEY_PREFIX)}([0-9a-f]{{12}})-([A-Za-z0-9_-]{{43}})$")
_LAST_USED_EVERY_S = 60
"""``last_used_at`` is written at most once a minute per key: a busy key costs no UPDATE per request."""


def split_api_key(key: str) -> tuple[str, str] | None:
    """(public id, secret) of a well-formed key, else ``None``.  Split by the format, not at the last ``-``:
    the URL-safe secret may itself hold ``-``."""
    match = _API_KEY_RE.match(key)
    return (match.group(1), match.group(2)) if match else None


class ApiKeyStore(Store):
    """Keys are made, checked, listed and revoked here; only their hashes are stored."""

    async def create_api_key(
        self, platform: str, workspace: str, user_id: str, note: str | None = None
    ) -> tuple[ApiKey, str]:
        """A new key for ``user_id`` of ``workspace`` on ``platform``: (its row, the key).  The key itself is
        returned only here — the table keeps its SHA-256 — so the caller shows it once."""
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        key = f"{API_KEY_PREFIX}{key_id}-{secret}"
        row = ApiKey(key_id=key_id, secret_hash=_key_hash(key), platform=platform, workspace=workspace,
                     user_id=user_id, note=note, created_at=self.now())  # fmt: skip
        async with self.sessions.begin() as session:
            session.add(row)
        return row, key

    async def verify_api_key(self, platform: str, key: str) -> ApiKey | None:
        """The live key ``key`` names on ``platform``, or ``None`` (malformed, unknown, revoked, another
        platform's).  The hashes are compared in constant time (a hash is computed and compared even when the
        id is unknown); ``last_used_at`` is recorded (at most once a minute)."""
        parts = split_api_key(key)
        async with self.sessions() as session:
            row = await session.scalar(select(ApiKey).where(ApiKey.key_id == parts[0])) if parts else None
        expected = row.secret_hash if row is not None else "0" * 64
        if not hmac.compare_digest(_key_hash(key), expected) or row is None:
            return None
        if row.revoked_at is not None or row.platform != platform:
            return None
        now = self.now()
        if row.last_used_at is None or (now - as_utc(row.last_used_at)).total_seconds() >= _LAST_USED_EVERY_S:
            async with self.sessions.begin() as session:
                await session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
            row.last_used_at = now
        return row

    async def api_keys(self, platform: str | None = None) -> list[ApiKey]:
        """Every key (revoked ones too), oldest first; optionally of one platform."""
        async with self.sessions() as session:
            query = select(ApiKey).order_by(ApiKey.id)
            if platform:
                query = query.where(ApiKey.platform == platform)
            return list(await session.scalars(query))

    async def revoke_api_key(self, key_ref: int | str) -> ApiKey | None:
        """Revoke the key with row id or public ``key_id`` ``key_ref``: the row, or ``None`` when there is none.
        Revoking a revoked key changes nothing (its first ``revoked_at`` stays)."""
        column = ApiKey.id if isinstance(key_ref, int) else ApiKey.key_id
        async with self.sessions.begin() as session:
            row = await session.scalar(select(ApiKey).where(column == key_ref))
            if row is not None and row.revoked_at is None:
                row.revoked_at = self.now()
            return row


def _key_hash(key: str) -> str:
    """SHA-256 of an API key: keys are 256 random bits, so a fast hash is as safe as a slow one here."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
