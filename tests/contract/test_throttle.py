"""The S3 store under rate limits (hpcstage.store.throttle), against a real S3 server: every
way bytes and requests move is paced, and the bytes are still exact.

Only lower bounds are asserted: ``n`` units at a rate ``r`` with a burst of one second of it
take at least ``(n - r) / r`` seconds. Each path is checked with its own store and limits.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hpcstage.store.protocol import MIB
from hpcstage.store.s3 import S3Store
from hpcstage.store.throttle import Limiter, Throttle

from .conftest import S3Server, make_s3_store

pytestmark = pytest.mark.anyio


def _least(amount: float, rate: float) -> float:
    return (amount - rate) / rate


async def _download(store: S3Store, key: str) -> bytes:
    ref = await store.head(key)
    fd = os.memfd_create("throttled", os.MFD_CLOEXEC)
    try:
        await store.download(ref, fd)
        return os.pread(fd, ref.size, 0)
    finally:
        os.close(fd)


@pytest.fixture
async def plain(s3_server: S3Server) -> AsyncIterator[S3Store]:
    """An unlimited store, to put the test objects."""
    store = make_s3_store(s3_server)
    try:
        yield store
    finally:
        await store.close()


async def _put(store: S3Store, tmp_path: Path, key: str, body: bytes) -> None:
    path = tmp_path / uuid.uuid4().hex
    path.write_bytes(body)
    await store.upload(path, key)


@pytest.mark.parametrize(
    ("what", "settings"),
    [
        ("one streamed GET", {"multipart_threshold": 64 * MIB, "part_size": 64 * MIB}),
        ("ranged parts, lean GET threads", {"lean_get": True}),
        ("ranged parts, the SDK", {"lean_get": False}),
    ],
)
async def test_downloaded_bytes_are_paced_as_they_arrive(
    s3_server: S3Server, plain: S3Store, tmp_path: Path, what: str, settings: dict[str, Any]
) -> None:
    body = os.urandom(12 * MIB)
    key = f"throttle/{uuid.uuid4().hex}"
    await _put(plain, tmp_path, key, body)
    rate = 4 * MIB
    throttle = Throttle(download=Limiter(rate))
    store = make_s3_store(s3_server, throttle=throttle, **settings)
    try:
        started = time.monotonic()
        got = await _download(store, key)
        took = time.monotonic() - started
        lean = store.ranged_stats
        if settings.get("lean_get"):  # the path under test served the parts, not the SDK
            assert lean is not None and lean.served and not lean.fell_back, lean
    finally:
        await store.close()
    assert got == body, what
    assert took >= _least(len(body), rate), what


async def test_small_objects_wait_for_the_request_rate(
    s3_server: S3Server, plain: S3Store, tmp_path: Path
) -> None:
    prefix = f"throttle/{uuid.uuid4().hex}/"
    bodies = {f"{prefix}{i:03d}": os.urandom(512) for i in range(60)}
    for key, body in bodies.items():
        await _put(plain, tmp_path, key, body)
    rate = 20.0
    store = make_s3_store(s3_server, throttle=Throttle(requests=Limiter(rate)))
    try:
        started = time.monotonic()
        got = {key: await store.lean_bytes(await store.head(key)) for key in bodies}
        took = time.monotonic() - started
    finally:
        await store.close()
    assert {k: v.body if v else None for k, v in got.items()} == bodies
    assert took >= _least(2 * len(bodies), rate)  # a HEAD and a lean GET each


@pytest.mark.parametrize("size", [3 * MIB, 12 * MIB], ids=["one PUT", "parts"])
async def test_uploaded_bytes_are_paced(
    s3_server: S3Server, plain: S3Store, tmp_path: Path, size: int
) -> None:
    body = os.urandom(size)
    path = tmp_path / "out"
    path.write_bytes(body)
    key = f"throttle/{uuid.uuid4().hex}"
    rate = size / 3  # three seconds' worth
    store = make_s3_store(s3_server, throttle=Throttle(upload=Limiter(rate)))
    try:
        started = time.monotonic()
        await store.upload(path, key)
        took = time.monotonic() - started
    finally:
        await store.close()
    assert await _download(plain, key) == body
    assert took >= _least(size, rate)
