"""`ReadCache`: answers to the API's hottest reads, kept until anything stored changes.

A polled batch is read far more often than it changes, and every request looks up its
key: under a 50-connection poll those reads, and encoding the batch, were most of a GET's
time. The cache is exact, not eventually consistent. `refresh()` asks the store for its
`read_version()` once per request, before anything kept is used (the Authenticator calls
it, and every route that reads through the cache is authenticated): when the version
moved (any commit, by any connection or process), everything kept is dropped. An answer
read after the version was taken can only be newer than it, and is dropped at the next
change. A store that cannot tell cheaply (PostgreSQL) moves its version every time.

Reads go through `store.call`, so on PostgreSQL one may suspend while other requests
refresh, and a change commits meanwhile: an answer is kept only if no refresh moved the
version while it was read (`put`), so it cannot outlive a change it may have missed.
`read_version()` itself is called on the loop: a pragma on SQLite's local file, a
counter on PostgreSQL, never a round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .models import encoder

if TYPE_CHECKING:
    from .store import Store

MAX_ENTRIES = 4096  # past this, everything kept is dropped (keys sprayed by a client)


class ReadCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.version: Any = None
        self.kept: dict[Any, Any] = {}

    def refresh(self) -> None:
        """Drop everything kept if anything stored changed since the last refresh."""
        version = self.store.read_version()
        if version != self.version or len(self.kept) >= MAX_ENTRIES:
            self.kept.clear()
            self.version = version

    def get(self, key: Any) -> Any:
        return self.kept.get(key)

    def put(self, key: Any, value: Any, version: Any) -> None:
        """Keep `value`, read under `version` (this cache's `version` when the read
        began), unless a refresh has moved the version since: then the read may predate
        a change that refresh saw, and it is not kept."""
        if version == self.version:
            self.kept[key] = value

    async def read(self, key: Any, read: Callable[[], Any]) -> Any:
        """`read()`, through the store's `call`, kept under `key` (see `put`)."""
        version = self.version
        value = await self.store.call(read)
        self.put(key, value, version)
        return value

    async def body(self, key: Any, read: Callable[[], Any]) -> bytes:
        """The JSON of `read()`, encoded once while nothing changes (an error that
        `read` raises is raised, and nothing is kept)."""
        body = self.kept.get(key)
        if body is None:
            body = await self.read(key, lambda: encoder.encode(read()))
        return body
