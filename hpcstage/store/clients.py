"""A small least-recently-used cache of clients that must be closed, such as one S3 client per
bucket (pure: the clients are made and closed by the caller's functions).

Users name buckets (``hpcstage trash ls BUCKET``), so a cache that keeps every client forever
grows with each name and holds a connection pool for each. This one keeps at most ``size``
idle clients and closes the least recently used beyond that; a client is handed out as a
lease, and one in use is never closed under its user (the cache may then hold more than
``size`` for as long as those leases last).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Closable(Protocol):
    async def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


@dataclass
class _Entry(Generic[C]):
    client: C
    users: int = 0


class ClientCache(Generic[C]):
    """At most ``size`` idle clients by key, made by ``make`` on first use."""

    def __init__(self, size: int, make: Callable[[str], C]) -> None:
        if size < 1:
            raise ValueError("a client cache holds at least one client")
        self._size = size
        self._make = make
        self._entries: OrderedDict[str, _Entry[C]] = OrderedDict()  # least recent first

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def lease(self, key: str) -> AsyncIterator[C]:
        """The client for ``key`` for the duration of the ``async with`` block."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(self._make(key))
        self._entries.move_to_end(key)
        entry.users += 1
        try:
            await self._evict()
            yield entry.client
        finally:
            entry.users -= 1
            if self._entries.get(key) is not entry and entry.users == 0:
                await entry.client.close()  # dropped (renew) while in use: its last user left
            await self._evict()

    async def renew(self) -> None:
        """Forget every client (new ones are made on next use): idle ones are closed now,
        leased ones when their last lease ends. For new credentials, say."""
        dropped, self._entries = list(self._entries.values()), OrderedDict()
        for entry in dropped:
            if entry.users == 0:
                await entry.client.close()

    async def _evict(self) -> None:
        """Close idle clients, least recently used first, while there are more than ``size``."""
        while len(self._entries) > self._size:
            idle = next((k for k, e in self._entries.items() if e.users == 0), None)
            if idle is None:
                return
            # Out of the cache before the await: nobody leases it while it closes.
            await self._entries.pop(idle).client.close()

    async def close(self) -> None:
        """Close every client (at shutdown: leases still running lose theirs)."""
        while self._entries:
            _key, entry = self._entries.popitem(last=False)
            await entry.client.close()
