"""The gateway's response cache for handlers their service declares deterministic.

A deterministic handler gives the same answer to the same request from the same artifact,
so the gateway may answer a repeated call itself. Entries are keyed by a hash of the
artifact id, the handler, the request's content type and its body, and evicted least
recently used first once either bound (entries or bytes) is reached.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """A replica's answer as the gateway relays (and may cache) it."""

    status: int
    body: bytes
    media_type: str | None
    replica: str
    artifact: str
    region: str


def cache_key(artifact: str, handler: str, content_type: str, body: bytes) -> str:
    """SHA-256 over artifact id, handler, content type and body, each length-delimited."""
    digest = hashlib.sha256()
    for part in (artifact.encode(), handler.encode(), content_type.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


class ResponseCache:
    """An LRU map of cache keys to 200 replies, bounded by entries and by body bytes."""

    def __init__(self, max_entries: int = 1024, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, Reply] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def get(self, key: str) -> Reply | None:
        reply = self._entries.get(key)
        if reply is not None:
            self._entries.move_to_end(key)
        return reply

    def put(self, key: str, reply: Reply) -> bool:
        """Store a 200 reply; False when it is not cacheable or larger than the byte bound."""
        if not self.enabled or reply.status != 200 or len(reply.body) > self.max_bytes:
            return False
        self._drop(key)
        self._entries[key] = reply
        self.bytes += len(reply.body)
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old.body)
