"""Listing the recycle bin in pages: each request examines a bounded number of keys and says
where to continue; following the pages yields every entry exactly once (pure, a fake listing)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from hpcstage.core.identity import ObjectRef
from hpcstage.errors import HpcstageError
from hpcstage.staging import trash

PREFIX = ".hpcstage-trash/"


class FakeBucket:
    """Sorted keys, listed as S3 does (StartAfter honoured unless ``ignores_start_after``)."""

    def __init__(self, bucket: str, keys: list[str], ignores_start_after: bool = False) -> None:
        self.bucket = bucket
        self.keys = sorted(keys)
        self.ignores = ignores_start_after
        self.listed = 0  # keys handed out, over all listings

    async def list(self, prefix: str, *, start_after: str = "") -> AsyncIterator[ObjectRef]:
        for key in self.keys:
            if key.startswith(prefix) and (self.ignores or key > start_after):
                self.listed += 1
                yield ObjectRef("s3", self.bucket, key, "e", 1)


def leases(
    buckets: dict[str, FakeBucket],
) -> trash.Lease:
    @asynccontextmanager
    async def lease(name: str) -> AsyncIterator[FakeBucket]:
        yield buckets[name]

    def open_one(name: str) -> AbstractAsyncContextManager[FakeBucket]:
        return lease(name)

    return open_one


def keys(n: int, job: str = "7") -> list[str]:
    return [f"{PREFIX}2026-12-0{1 + i % 3}/{job}/out/{i:04d}" for i in range(n)]


def follow(
    buckets: dict[str, FakeBucket], names: list[str], limit: int
) -> tuple[list[tuple[str, str]], int]:
    """Every (bucket, trash key) over all pages, and how many requests it took."""

    async def run() -> tuple[list[tuple[str, str]], int]:
        found: list[tuple[str, str]] = []
        token, requests = "", 0
        while True:
            page = await trash.list_page(names, leases(buckets), PREFIX, token, limit)
            requests += 1
            found += [(e.bucket, e.trash_key) for e in page.entries]
            if not page.next:
                return found, requests
            token = page.next

    return asyncio.run(run())


def test_pages_over_several_buckets_yield_every_entry_once() -> None:
    buckets = {
        "a": FakeBucket("a", [*keys(7), "elsewhere/x", f"{PREFIX}not-a-day/x"]),
        "b": FakeBucket("b", []),
        "c": FakeBucket("c", keys(5, job="8")),
    }
    found, requests = follow(buckets, ["a", "b", "c"], limit=3)
    expected = [("a", k) for k in sorted(keys(7))] + [("c", k) for k in sorted(keys(5, "8"))]
    assert found == expected
    assert requests <= 2 + (7 + 1 + 5) // 3 + 1


def test_one_request_examines_at_most_limit_keys() -> None:
    big = FakeBucket("a", keys(10_000))
    page = asyncio.run(trash.list_page(["a"], leases({"a": big}), PREFIX, "", 50))
    assert len(page.entries) == 50 and page.next
    assert big.listed <= 50


def test_a_store_that_ignores_start_after_still_ends_without_repeats() -> None:
    buckets = {"a": FakeBucket("a", keys(9), ignores_start_after=True)}
    found, _ = follow(buckets, ["a"], limit=4)
    assert found == [("a", k) for k in sorted(keys(9))]


@pytest.mark.parametrize("token", ["junk", "eyJ4IjogMX0", "W10", "WyJhIl0"])
def test_a_token_not_made_by_the_listing_is_refused(token: str) -> None:
    with pytest.raises(HpcstageError, match="continuation token"):
        trash.decode_token(token)


def test_a_token_for_another_bucket_than_the_one_asked_for_is_refused() -> None:
    token = trash.encode_token("other", f"{PREFIX}2026-12-01/7/x")
    buckets = {"a": FakeBucket("a", keys(3))}
    with pytest.raises(HpcstageError, match="continuation token"):
        asyncio.run(trash.list_page(["a"], leases(buckets), PREFIX, token, 10))
