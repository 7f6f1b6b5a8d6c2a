"""Bounded LRU caches the engine keeps between requests.

* :class:`ImageTokenCache` — projected visual tokens per image (keyed by the SHA-256 of the
  image bytes), so a thread's image runs through the ViT/Q-Former once, not every turn.
* :class:`PrefixStore` — the KV cache of a conversation's last turn (prompt + answer) and the
  *items* it was computed from (token ids, image-token slots), so a follow-up prefills only
  what is new.  Which entries stay is decided by the scheduler's token budget.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["ImageTokenCache", "Item", "PrefixEntry", "PrefixStore", "common_prefix", "image_key"]

# One position of a context: a text token id, or ("img", image key, index within that image's tokens).
Item = int | tuple[str, str, int]


def image_key(data: bytes) -> str:
    """Content hash of an image's bytes (platform URLs expire; bytes do not change)."""
    return hashlib.sha256(data).hexdigest()


def common_prefix(a: list[Item], b: list[Item]) -> int:
    """Length of the longest common prefix of two item lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ImageTokenCache:
    """LRU of ``Tensor[N, H]`` visual tokens keyed by image hash."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        tokens = self._items.get(key)
        if tokens is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return tokens

    def put(self, key: str, tokens: torch.Tensor) -> None:
        self._items[key] = tokens
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class PrefixEntry:
    """KV of one conversation's computed positions: per layer ``(K, V)`` each ``[1, heads, T, head_dim]``."""

    items: list[Item]
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def tokens(self) -> int:
        return len(self.items)


class PrefixStore:
    """Conversation key → :class:`PrefixEntry`; eviction is ordered by the scheduler."""

    def __init__(self) -> None:
        self._entries: dict[str, PrefixEntry] = {}
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    def take(self, key: str | None, items: list[Item]) -> tuple[int, PrefixEntry | None]:
        """Remove and return the entry for ``key`` with the usable prefix length for ``items``.

        At least one position is always left to compute, so the prefill yields logits.
        """
        entry = self._entries.pop(key, None) if key else None
        usable = min(common_prefix(entry.items, items), len(items) - 1) if entry else 0
        if usable > 0:
            self.hits += 1
            self.reused_tokens += usable
            return usable, entry
        self.misses += 1
        return 0, None

    def put(self, key: str, entry: PrefixEntry) -> None:
        self._entries[key] = entry

    def evict(self, key: str) -> None:
        self._entries.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
