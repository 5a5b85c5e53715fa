"""The daemon's bounded cache of store clients (one per bucket): pure, with a fake client."""

from __future__ import annotations

import asyncio

from hpcstage.store.clients import ClientCache


class FakeClient:
    def __init__(self, key: str, closed: list[str]) -> None:
        self.key = key
        self._closed = closed

    async def close(self) -> None:
        self._closed.append(self.key)


def cache(size: int, made: list[str], closed: list[str]) -> ClientCache[FakeClient]:
    def make(key: str) -> FakeClient:
        made.append(key)
        return FakeClient(key, closed)

    return ClientCache(size, make)


def test_clients_of_many_buckets_stay_bounded_and_evicted_ones_are_closed() -> None:
    made: list[str] = []
    closed: list[str] = []
    clients = cache(3, made, closed)

    async def run() -> None:
        for i in range(100):  # a user naming bucket after bucket
            async with clients.lease(f"b{i}") as client:
                assert client.key == f"b{i}"
            assert len(clients) <= 3

    asyncio.run(run())
    assert made == [f"b{i}" for i in range(100)]
    assert closed == [f"b{i}" for i in range(97)]  # least recently used first, each once


def test_a_client_in_use_is_reused_and_never_closed_under_its_user() -> None:
    made: list[str] = []
    closed: list[str] = []
    clients = cache(1, made, closed)

    async def run() -> None:
        async with clients.lease("a") as a:
            async with clients.lease("a") as again:
                assert again is a
            async with clients.lease("b"):
                assert closed == []  # two over a bound of one: both in use
            assert closed == ["b"]  # the only idle one; "a" is still in use
        assert len(clients) == 1
        async with clients.lease("b"):
            assert closed == ["b", "a"]  # "a" idle now, and the least recently used
        await clients.close()

    asyncio.run(run())
    assert made == ["a", "b", "b"]
    assert closed == ["b", "a", "b"]


def test_recent_use_keeps_a_client() -> None:
    made: list[str] = []
    closed: list[str] = []
    clients = cache(2, made, closed)

    async def run() -> None:
        for key in ("a", "b", "a", "c", "a", "d"):
            async with clients.lease(key):
                pass

    asyncio.run(run())
    assert made == ["a", "b", "c", "d"]
    assert closed == ["b", "c"]


def test_renew_closes_idle_clients_now_and_leased_ones_when_their_lease_ends() -> None:
    # New store credentials: no client made with the old ones is handed out again.
    made: list[str] = []
    closed: list[str] = []
    clients = cache(3, made, closed)

    async def run() -> None:
        async with clients.lease("idle"):
            pass
        async with clients.lease("busy") as busy:
            await clients.renew()
            assert closed == ["idle"]  # the one in use is not closed under its user
            async with clients.lease("busy") as fresh:
                assert fresh is not busy  # made anew, with the new credentials
        assert closed == ["idle", "busy"] and len(clients) == 1

    asyncio.run(run())
    assert made == ["idle", "busy", "busy"]
