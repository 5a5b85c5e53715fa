"""One conformance suite for every ObjectStore, then what is specific to S3 and to files.

The ``h`` fixture (conftest.py) runs each contract test against S3Store on a real S3 server
(``rclone serve s3``) and against FsStore on a temp directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import botocore.exceptions as bce
import pytest
from botocore.parsers import ResponseParserError

from hpcstage.core.identity import ObjectRef
from hpcstage.errors import (
    CredentialError,
    ObjectChangedError,
    ObjectMissingError,
    StoreError,
    TransientStoreError,
)
from hpcstage.retry import RetryPolicy
from hpcstage.store import checksums, s3_download
from hpcstage.store.credentials import resolve_credentials
from hpcstage.store.fs import FsStore, translate_fs_error
from hpcstage.store.protocol import LEAN_MAX, MIB, DownloadResult, ObjectStore, parse_s3_url
from hpcstage.store.s3 import S3Store, download_bytes
from hpcstage.store.s3_errors import translate_s3_error
from hpcstage.store.verify import check_md5

from .conftest import BUCKET, SMALL_POLICY, Harness, S3Server, make_s3_store

pytestmark = pytest.mark.anyio

SMALL = 100 * 1024
LARGE = 12 * MIB  # > the suite's 5 MiB threshold: three 5 MiB-part ranged GETs, multipart PUT


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes (so a wrong offset changes the hash)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * 4096  # 128 KiB
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    path = tmp_path / "scratch"
    path.mkdir()
    return path


async def put(h: Harness, scratch: Path, name: str, data: bytes) -> ObjectRef:
    source = scratch / f"up-{len(os.listdir(scratch))}"
    source.write_bytes(data)
    return await h.store.upload(source, h.key(name))


async def fetch(store: ObjectStore, ref: ObjectRef, scratch: Path) -> tuple[DownloadResult, bytes]:
    target = scratch / f"down-{len(os.listdir(scratch))}"
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    progress: list[int] = []
    try:
        result = await store.download(ref, fd, progress=progress.append)
    finally:
        os.close(fd)
    assert sum(progress) == ref.size
    return result, target.read_bytes()


async def listed(store: ObjectStore, prefix: str) -> dict[str, ObjectRef]:
    return {ref.key: ref async for ref in store.list(prefix)}


# --- the contract --------------------------------------------------------------------------


async def test_list_streams_objects_under_the_prefix_only(h: Harness, scratch: Path) -> None:
    names = {"a/1": 3, "a/2": 0, "a/sub/3": 5, "a/sub/deeper/4": 7, "ab/x": 1, "b/y": 2}
    for name, size in names.items():
        await put(h, scratch, name, payload(size))
    found = await listed(h.store, h.key("a/"))
    assert set(found) == {h.key(n) for n in ("a/1", "a/2", "a/sub/3", "a/sub/deeper/4")}
    for key, ref in found.items():
        assert ref.size == names[key.removeprefix(h.base)]
        assert ref.etag
        assert ref == await h.store.head(key)


async def test_list_is_a_string_prefix_and_empty_for_nothing(h: Harness, scratch: Path) -> None:
    for name in ("a/1", "ab/x", "b/y"):
        await put(h, scratch, name, b"z")
    assert set(await listed(h.store, h.key("a"))) == {h.key("a/1"), h.key("ab/x")}
    assert await listed(h.store, h.key("nothing/")) == {}


async def test_head_describes_what_upload_returned(h: Harness, scratch: Path) -> None:
    ref = await put(h, scratch, "obj", payload(SMALL))
    assert ref.key == h.key("obj")
    assert ref.size == SMALL
    assert await h.store.head(h.key("obj")) == ref


@pytest.mark.parametrize("size", [0, 1, SMALL, LARGE], ids=["empty", "1B", "small", "large"])
async def test_download_roundtrip_is_verified(h: Harness, scratch: Path, size: int) -> None:
    data = payload(size, seed=size)
    ref = await put(h, scratch, "obj", data)
    result, written = await fetch(h.store, ref, scratch)
    assert written == data
    # S3: the plain-MD5 ETag is checked (a multipart one is no MD5 of the bytes); a file has
    # nothing to check content against. Only objects up to LEAN_MAX get a SHA-256 recorded.
    verified = "md5" if h.kind == "s3" and "-" not in ref.etag else ""
    sha256 = hashlib.sha256(data).hexdigest() if size <= LEAN_MAX else ""
    assert result == DownloadResult(sha256, size, verified)


async def test_download_bytes_gives_verified_bytes_in_memory(h: Harness, scratch: Path) -> None:
    data = payload(SMALL, seed=11)
    ref = await put(h, scratch, "small", data)
    body, sha256_hex = await download_bytes(h.store, ref)
    assert (body, sha256_hex) == (data, hashlib.sha256(data).hexdigest())
    liar = ObjectRef(ref.store, ref.bucket, ref.key, ref.etag, ref.size + 1)
    with pytest.raises(StoreError, match=r"truncated|changed"):
        await download_bytes(h.store, liar)


async def test_download_bytes_through_the_sdk(s3_server: S3Server, scratch: Path) -> None:
    async with make_s3_store(s3_server, lean_get=False) as store:
        h = Harness("s3", store, f"sdk-{uuid.uuid4().hex[:8]}/", _none)
        ref = await put(h, scratch, "obj", b"through the sdk")
        assert (await download_bytes(store, ref))[0] == b"through the sdk"


async def test_large_objects_move_in_parallel_parts(h: Harness, scratch: Path) -> None:
    data = payload(LARGE)
    ref = await put(h, scratch, "big", data)
    assert (await fetch(h.store, ref, scratch))[1] == data
    if h.calls is not None:  # S3: a multipart upload of 3 parts and 3 ranged GETs
        assert h.calls["CreateMultipartUpload"] == 1
        assert h.calls["UploadPart"] == 3
        assert h.calls["CompleteMultipartUpload"] == 1
        assert h.calls["PutObject"] == 0
        # The parts came through the lean ranged GET (hpcstage.store.ranged.RangeGet), not the SDK.
        assert isinstance(h.store, S3Store) and h.store.ranged_stats is not None
        assert (h.store.ranged_stats.served, h.store.ranged_stats.fell_back) == (3, 0)
        assert h.calls["GetObject"] == 0
        stats = h.store.write_stats
        if "-" not in ref.etag:
            # rclone gives even a multipart upload the MD5 of its bytes as ETag: that MD5 is
            # checked, so the parts went through the page cache and were read back in order.
            assert (stats.checked_inline, stats.read_back, stats.direct_bytes) == (0, 1, 0)
        else:
            # AWS's "-N" ETag (moto) is no MD5 and this store keeps no checksum: nothing to
            # compute, so the parts were written as they came, with O_DIRECT.
            assert (stats.checked_inline, stats.read_back) == (1, 0)


async def test_parts_are_streamed_from_the_file_not_held_in_memory(
    s3_server: S3Server, scratch: Path
) -> None:
    # A 100 TiB file has 10 GiB parts (S3 allows 10,000): reading each into memory (and
    # joining its chunks) would take 20 GiB per part in flight.
    part = 16 * MIB
    source = scratch / "src"
    source.write_bytes(payload(3 * part))
    async with make_s3_store(s3_server, part_size=part, multipart_threshold=part) as store:
        await store.head_or_none("streamed/big")  # the client (its models: MiBs) exists now
        tracemalloc.start()
        try:
            ref = await store.upload(source, "streamed/big")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (await fetch(store, ref, scratch))[1] == payload(3 * part)
    # Three parts in flight held at least 3 x 2 x 16 MiB before; now some 1 MiB reads each.
    assert peak < part, f"{peak / MIB:.1f} MiB held at once for {part // MIB} MiB parts"


async def test_large_objects_through_the_sdk_are_ranged_gets(
    s3_server: S3Server, scratch: Path
) -> None:
    ranges: list[str] = []

    def on_call(model: Any, params: Any, **_: Any) -> None:
        if model.name == "GetObject":
            ranges.append(params.get("headers", {}).get("Range", ""))

    async with make_s3_store(s3_server, lean_get=False) as store:
        h = Harness("s3", store, f"sdk-{uuid.uuid4().hex[:8]}/", _none)
        (await store._bucket.client()).meta.events.register("before-call.s3", on_call)
        data = payload(LARGE, seed=5)
        ref = await put(h, scratch, "big", data)
        assert (await fetch(store, ref, scratch))[1] == data
        assert store.ranged_stats is None
    assert sorted(ranges) == [
        f"bytes=0-{5 * MIB - 1}",
        f"bytes={10 * MIB}-{LARGE - 1}",
        f"bytes={5 * MIB}-{10 * MIB - 1}",
    ]


async def test_missing_object_is_a_store_error_naming_it(h: Harness, scratch: Path) -> None:
    key = h.key("no/such/object")
    with pytest.raises(StoreError, match=re.escape(key)) as info:
        await h.store.head(key)
    # Neither transient nor a credential problem: the object is simply not there.
    assert type(info.value) is ObjectMissingError
    ghost = ObjectRef(getattr(h.store, "store_id", ""), getattr(h.store, "bucket", ""), key, "", 4)
    with pytest.raises(StoreError, match=re.escape(key)):
        await fetch(h.store, ghost, scratch)


async def test_download_refuses_an_object_changed_since_listed(h: Harness, scratch: Path) -> None:
    old = await put(h, scratch, "obj", payload(SMALL, seed=1))
    await put(h, scratch, "obj", payload(SMALL + 1, seed=2))
    with pytest.raises(StoreError, match="changed"):
        await fetch(h.store, old, scratch)


async def test_copy_duplicates_an_object(h: Harness, scratch: Path) -> None:
    data = payload(SMALL, seed=3)
    src = await put(h, scratch, "src", data)
    await h.store.copy(h.key("src"), h.key("dir/dst"))
    dst = await h.store.head(h.key("dir/dst"))
    assert dst.size == src.size
    assert (await fetch(h.store, dst, scratch))[1] == data
    assert await h.store.head(h.key("src")) == src


async def test_delete_removes_and_is_idempotent(h: Harness, scratch: Path) -> None:
    await put(h, scratch, "gone", b"bye")
    await h.store.delete(h.key("gone"))
    with pytest.raises(StoreError, match="gone"):
        await h.store.head(h.key("gone"))
    await h.store.delete(h.key("gone"))  # missing: still fine
    assert await listed(h.store, h.base) == {}


async def test_failed_upload_leaves_nothing_behind(h: Harness, scratch: Path) -> None:
    # Large, so the failure comes mid-transfer: after the first part (S3) or chunk (files).
    source = scratch / "src"
    source.write_bytes(payload(LARGE))

    def explode(_: int) -> None:
        raise RuntimeError("caller gave up")

    with pytest.raises(RuntimeError, match="caller gave up"):
        await h.store.upload(source, h.key("half"), progress=explode)
    with pytest.raises(StoreError):
        await h.store.head(h.key("half"))
    assert await h.leftovers() == []


async def test_upload_reports_progress_once_per_byte(h: Harness, scratch: Path) -> None:
    source = scratch / "src"
    source.write_bytes(payload(LARGE))
    progress: list[int] = []
    ref = await h.store.upload(source, h.key("big"), progress=progress.append)
    assert sum(progress) == LARGE == ref.size
    assert all(step > 0 for step in progress)


@pytest.mark.parametrize("size", [SMALL, LARGE])
async def test_upload_fd_sends_the_open_files_bytes_whatever_its_path_names_now(
    h: Harness, scratch: Path, size: int
) -> None:
    # Stage-out checks a file on its fd, then uploads from it: a path swapped in between
    # (here another file renamed over it) must not be what is stored.
    source, other = scratch / "checked", scratch / "other"
    source.write_bytes(payload(size, seed=1))
    other.write_bytes(payload(size, seed=2))
    fd = os.open(source, os.O_RDONLY)
    try:
        os.replace(other, source)
        ref = await h.store.upload_fd(fd, h.key("fd"))
    finally:
        os.close(fd)
    _, body = await fetch(h.store, ref, scratch)
    assert body == payload(size, seed=1)


# --- S3 specifics ----------------------------------------------------------------------------


@pytest.fixture
async def s3(s3_server: S3Server) -> AsyncIterator[S3Store]:
    async with make_s3_store(s3_server) as store:
        yield store


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket/prefix/") == ("bucket", "prefix/")
    assert parse_s3_url("s3://bucket/a/b.txt") == ("bucket", "a/b.txt")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    for bad in ("http://x/y", "s3:///key", "s3://b/a/../etc"):
        with pytest.raises(ValueError, match=r"s3://|bucket|'\.\.'"):
            parse_s3_url(bad)


async def test_s3_list_reads_pages_lazily(s3_server: S3Server, scratch: Path) -> None:
    store = make_s3_store(s3_server, list_page_size=2)
    harness = Harness("s3", store, "lazy-list/", lambda: _none())
    try:
        for n in range(5):
            await put(harness, scratch, f"k{n}", b"x")
        client = await store._bucket.client()
        pages: list[str] = []
        client.meta.events.register(
            "before-call.s3.ListObjectsV2", lambda **kw: pages.append("page")
        )
        listing = store.list("lazy-list/")
        first = await anext(listing)
        assert first.key == "lazy-list/k0"
        assert len(pages) == 1  # one page fetched for the first key, not the whole listing
        rest = [ref.key async for ref in listing]
        assert len(rest) == 4
        assert len(pages) == 3
    finally:
        await store.close()


async def test_s3_list_starts_after_a_key_and_pages_on_from_there(
    s3_server: S3Server, scratch: Path
) -> None:
    store = make_s3_store(s3_server, list_page_size=2)
    harness = Harness("s3", store, "after-list/", lambda: _none())
    try:
        for n in range(6):
            await put(harness, scratch, f"k{n}", b"x")
        keys = [ref.key async for ref in store.list("after-list/", start_after="after-list/k1")]
        assert keys == [f"after-list/k{n}" for n in range(2, 6)]  # over pages of 2
        assert [r.key async for r in store.list("after-list/", start_after="after-list/k5")] == []
    finally:
        await store.close()


async def _none() -> list[str]:
    return []


# --- the lean GET of small objects (hpcstage.store.lean) against the real server ---

AWKWARD_NAMES = ["plain.txt", "sp ace/ü-ß.pdb", "a+b=c&d;e,f", "pct%20x/~tilde", "q?x#y", "..dots"]


async def roundtrip_awkward_keys(
    s3: S3Store, scratch: Path, names: list[str], size: int, seed: int
) -> None:
    """Upload an object of about ``size`` bytes under each name, fetch it back, verified."""
    h = Harness("s3", s3, f"awkward-{uuid.uuid4().hex[:8]}/", _none)
    for n, name in enumerate(names):
        data = payload(size + n, seed=seed + n)
        ref = await put(h, scratch, name, data)
        result, written = await fetch(s3, ref, scratch)
        assert written == data
        sha256 = hashlib.sha256(data).hexdigest() if len(data) <= LEAN_MAX else ""
        assert (result.sha256_hex, result.verified) == (sha256, "md5")


async def test_small_objects_come_through_the_lean_get(s3: S3Store, scratch: Path) -> None:
    await roundtrip_awkward_keys(s3, scratch, AWKWARD_NAMES, 4096, seed=0)
    stats = s3.lean_stats
    assert stats is not None
    # The server checked every signature: a rejected one would have fallen back.
    assert (stats.served, stats.fell_back) == (len(AWKWARD_NAMES), 0), stats.reasons


async def test_lean_get_falls_back_and_the_sdk_reports(s3: S3Store, scratch: Path) -> None:
    h = Harness("s3", s3, f"lean-{uuid.uuid4().hex[:8]}/", _none)
    old = await put(h, scratch, "obj", payload(SMALL, seed=1))
    await put(h, scratch, "obj", payload(SMALL + 1, seed=2))
    with pytest.raises(StoreError, match="changed"):
        await fetch(s3, old, scratch)
    ghost = ObjectRef(s3.store_id, s3.bucket, h.key("missing"), "0" * 32, 4)
    with pytest.raises(ObjectMissingError, match="missing"):
        await fetch(s3, ghost, scratch)
    stats = s3.lean_stats
    assert stats is not None and stats.served == 0
    assert stats.reasons == {"size differs from listing": 1, "status 404": 1}


async def test_lean_get_with_a_wrong_secret_falls_back_to_a_credential_error(
    s3_server: S3Server, s3: S3Store, scratch: Path
) -> None:
    h = Harness("s3", s3, f"lean-{uuid.uuid4().hex[:8]}/", _none)
    ref = await put(h, scratch, "obj", b"secret data")
    bad = {"access_key": s3_server.access_key, "secret_key": "not-the-secret", "token": ""}
    async with make_s3_store(s3_server, credentials=bad) as store:
        with pytest.raises(CredentialError):
            await fetch(store, ref, scratch)
        stats = store.lean_stats
        assert stats is not None and stats.reasons == {"status 403": 1}


async def test_parts_of_a_single_put_object_are_checked_against_its_md5_etag(
    s3: S3Store, scratch: Path
) -> None:
    data = payload(LARGE, seed=7)
    key = f"single-put-{uuid.uuid4().hex[:8]}"
    client = await s3._bucket.client()  # a PUT of 12 MiB in one request: a plain-MD5 ETag
    await client.put_object(Bucket=BUCKET, Key=key, Body=data)
    ref = await s3.head(key)
    assert "-" not in ref.etag
    result, written = await fetch(s3, ref, scratch)  # 3 ranged GETs, hashed as they land
    assert written == data
    assert ref.etag == hashlib.md5(data, usedforsecurity=False).hexdigest()
    assert (result.verified, result.sha256_hex) == ("md5", "")
    # The same size with the wrong ETag: the MD5 of the parts is compared, and refused.
    liar = ObjectRef(ref.store, ref.bucket, ref.key, "0" * 32, ref.size)
    with pytest.raises(ObjectChangedError):  # the store's answers name the real ETag
        await fetch(s3, liar, scratch)


MIDDLE = 3 * MIB  # above LEAN_MAX, below the suite's threshold: one whole GET through the SDK


async def put_with_checksum(s3: S3Store, key: str, data: bytes, algorithm: str, value: str) -> None:
    """PUT in one request carrying a full-object checksum, as AWS SDKs send one by default
    (rclone serve s3 keeps what it is given without checking it, and returns it on HEAD)."""
    client = await s3._bucket.client()
    await client.put_object(
        Bucket=BUCKET, Key=key, Body=data, **{checksums.field(algorithm): value}
    )


@pytest.mark.parametrize("size", [MIDDLE, LARGE], ids=["whole-get", "ranged"])
@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
async def test_big_objects_are_checked_against_the_stores_checksum(
    s3: S3Store, scratch: Path, algorithm: str, size: int
) -> None:
    data = payload(size, seed=30)
    key = f"checksum-{algorithm}-{uuid.uuid4().hex[:8]}"
    await put_with_checksum(s3, key, data, algorithm, checksums.compute(algorithm, data))
    ref = await s3.head(key)
    result, written = await fetch(s3, ref, scratch)
    assert written == data
    # The store's checksum is what was checked (the MD5 ETag was not computed).
    assert (result.verified, result.sha256_hex, result.size) == (algorithm, "", size)
    stats = s3.write_stats
    if size < LARGE:  # one GET, checksummed as it streams
        assert (stats.checked_inline, stats.read_back, stats.direct_bytes) == (0, 0, 0)
    elif checksums.combinable(algorithm):  # parts' CRCs combined, written with O_DIRECT
        assert (stats.checked_inline, stats.read_back, stats.direct_bytes) == (1, 0, size)
    else:  # a SHA must see the bytes in order: read back from the page cache
        assert (stats.checked_inline, stats.read_back, stats.direct_bytes) == (0, 1, 0)


@pytest.mark.parametrize("how", ["sdk", "no-direct", "direct-refused"])
async def test_a_crc_is_combined_from_parts_on_every_path(
    s3_server: S3Server, scratch: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts checked as they arrive, whoever fetched and wrote them: the SDK (no lean ranged
    GET), the page cache (direct_writes off) or a file system that refuses O_DIRECT."""
    data = payload(LARGE + 4321, seed=32)  # a last part that ends inside a block
    key = f"combined-{how}-{uuid.uuid4().hex[:8]}"
    options: dict[str, Any] = {"lean_get": how != "sdk", "direct_writes": how != "no-direct"}
    if how == "direct-refused":  # as tmpfs before Linux 6.6 does

        def refuse(fd: int) -> int:
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(s3_download, "open_direct", refuse)
    async with make_s3_store(s3_server, **options) as store:
        await put_with_checksum(store, key, data, "crc32c", checksums.compute("crc32c", data))
        ref = await store.head(key)
        result, written = await fetch(store, ref, scratch)
        assert written == data and result.verified == "crc32c"
        stats = store.write_stats
        assert (stats.checked_inline, stats.read_back, stats.direct_bytes) == (1, 0, 0)
        refused = "the cache's file system refuses O_DIRECT (Invalid argument)"
        assert stats.direct_refused == (refused if how == "direct-refused" else "")
        # Bytes that contradict the checksum are caught on these paths too.
        await put_with_checksum(store, key, data, "crc32c", checksums.compute("crc32c", data[1:]))
        with pytest.raises(TransientStoreError, match="checksum mismatch"):
            await fetch(store, await store.head(key), scratch)


@pytest.mark.parametrize("size", [MIDDLE, LARGE], ids=["whole-get", "ranged"])
async def test_bytes_that_contradict_the_stores_checksum_are_refused(
    s3: S3Store, scratch: Path, size: int
) -> None:
    data = payload(size, seed=31)
    key = f"bad-checksum-{uuid.uuid4().hex[:8]}"
    wrong = checksums.compute("crc64nvme", data[:-1] + b"x")  # another object's checksum
    await put_with_checksum(s3, key, data, "crc64nvme", wrong)
    ref = await s3.head(key)
    assert ref.etag == hashlib.md5(data, usedforsecurity=False).hexdigest()  # MD5 would pass
    with pytest.raises(
        TransientStoreError, match=f"checksum mismatch .*CRC64NVME {re.escape(wrong)}"
    ):
        await fetch(s3, ref, scratch)


async def test_big_objects_with_awkward_keys_come_through_the_ranged_get(
    s3: S3Store, scratch: Path
) -> None:
    await roundtrip_awkward_keys(s3, scratch, AWKWARD_NAMES[:3], LARGE, seed=20)
    stats = s3.ranged_stats
    assert stats is not None
    assert (stats.served, stats.fell_back) == (9, 0), stats.reasons


async def test_a_big_object_changed_since_listed_is_refused_before_any_get(
    s3: S3Store, scratch: Path
) -> None:
    h = Harness("s3", s3, f"ranged-{uuid.uuid4().hex[:8]}/", _none)
    old = await put(h, scratch, "big", payload(LARGE, seed=1))
    await put(h, scratch, "big", payload(LARGE, seed=2))  # same size, new bytes and ETag
    with pytest.raises(ObjectChangedError, match="changed since it was listed"):
        await fetch(s3, old, scratch)
    stats = s3.ranged_stats
    assert stats is not None and (stats.served, stats.reasons) == (0, {})


async def test_ranged_get_falls_back_and_the_sdk_reports(
    s3: S3Store, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness("s3", s3, f"ranged-{uuid.uuid4().hex[:8]}/", _none)
    old = await put(h, scratch, "big", payload(LARGE, seed=1))
    await put(h, scratch, "big", payload(LARGE, seed=2))

    async def after_the_head(ref: ObjectRef) -> tuple[None, bool]:
        return None, True  # as if the object changed between the HEAD and the ranged GETs

    monkeypatch.setattr(s3._downloader, "_head_checks", after_the_head)
    with pytest.raises(ObjectChangedError, match="changed"):
        await fetch(s3, old, scratch)
    stats = s3.ranged_stats
    assert stats is not None and stats.served == 0
    # Parts still in flight when the first one failed are aborted (their threads stopped).
    assert set(stats.reasons) <= {"etag differs from listing", "aborted"}
    assert stats.reasons["etag differs from listing"] >= 1


async def test_no_lean_get_without_explicit_keys_or_through_a_proxy(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert make_s3_store(s3_server, lean_get=False).lean_stats is None
    assert make_s3_store(s3_server, lean_get=False).ranged_stats is None
    assert make_s3_store(s3_server, credentials=None).lean_stats is None
    assert make_s3_store(s3_server, addressing_style="auto").lean_stats is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert make_s3_store(s3_server).lean_stats is None


async def test_wrong_credentials_are_never_retried(s3_server: S3Server) -> None:
    retries: list[int] = []
    bad = {"access_key": s3_server.access_key, "secret_key": "not-the-secret", "token": ""}
    store = make_s3_store(
        s3_server,
        credentials=bad,
        retry=RetryPolicy(retries=5, base=0.01, cap=0.01),
        on_retry=lambda n, delay, exc: retries.append(n),
    )
    async with store:
        with pytest.raises(CredentialError, match=f"s3://{BUCKET}/k") as info:
            await store.head("k")
        with pytest.raises(CredentialError):
            await anext(store.list(""))
    assert retries == []
    assert "not-the-secret" not in str(info.value)


async def test_server_down_is_transient_after_retries(s3_server: S3Server) -> None:
    from devcluster.proc import free_port

    retries: list[int] = []
    store = make_s3_store(
        s3_server,
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        retry=RetryPolicy(retries=3, base=0.001, cap=0.01),
        on_retry=lambda n, delay, exc: retries.append(n),
    )
    async with store:
        with pytest.raises(TransientStoreError, match="gave up after 4 attempts"):
            await store.head("k")
    assert retries == [1, 2, 3]


async def test_missing_bucket_is_named(s3_server: S3Server, scratch: Path) -> None:
    async with make_s3_store(s3_server, bucket="no-such-bucket") as store:
        ref = ObjectRef(store.store_id, "no-such-bucket", "k", "", 1)
        with pytest.raises(StoreError, match="no such bucket") as info:
            await fetch(store, ref, scratch)
    assert "s3://no-such-bucket/k" in str(info.value)


async def test_truncated_object_is_transient(s3: S3Store, scratch: Path) -> None:
    h = Harness("s3", s3, "trunc/", _none)
    ref = await put(h, scratch, "obj", payload(SMALL))
    liar = ObjectRef(ref.store, ref.bucket, ref.key, ref.etag, ref.size + 10)
    with pytest.raises(TransientStoreError, match="truncated"):
        await fetch(s3, liar, scratch)


def test_checksum_mismatch_is_transient_and_multipart_etags_are_skipped() -> None:
    md5 = hashlib.md5(b"data", usedforsecurity=False).hexdigest()
    check_md5("s3://b/k", md5, md5)
    check_md5("s3://b/k", md5.upper(), md5)
    check_md5("s3://b/k", "0" * 32 + "-3", md5)  # multipart ETag: not an MD5 of the bytes
    with pytest.raises(TransientStoreError, match="checksum mismatch"):
        check_md5("s3://b/k", "0" * 32, md5)


def client_error(code: str, status: int, message: str = "server says") -> bce.ClientError:
    response: Any = {"Error": {"Code": code, "Message": message}}
    response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return bce.ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (client_error("SlowDown", 503), TransientStoreError),
        (client_error("RequestTimeout", 400), TransientStoreError),
        (client_error("InternalError", 500), TransientStoreError),
        (client_error("502", 502), TransientStoreError),
        (bce.EndpointConnectionError(endpoint_url="http://s3"), TransientStoreError),
        (bce.ReadTimeoutError(endpoint_url="http://s3"), TransientStoreError),
        (bce.IncompleteReadError(actual_bytes=1, expected_bytes=2), TransientStoreError),
        (aiohttp.ClientPayloadError("cut"), TransientStoreError),
        (client_error("InvalidAccessKeyId", 403), CredentialError),
        (client_error("SignatureDoesNotMatch", 403, "StringToSign AKIDSECRET"), CredentialError),
        (client_error("ExpiredToken", 400), CredentialError),
        (client_error("AccessDenied", 403), CredentialError),
        (client_error("403", 403), CredentialError),
        (bce.NoCredentialsError(), CredentialError),
        (client_error("NoSuchKey", 404), ObjectMissingError),
        (client_error("404", 404), ObjectMissingError),
        (client_error("InvalidArgument", 400), StoreError),
        (ResponseParserError("unclosed token: line 1"), StoreError),
    ],
)
def test_s3_errors_are_translated(exc: BaseException, kind: type[StoreError]) -> None:
    error = translate_s3_error(exc, "get s3://b/some/key")
    assert type(error) is kind
    assert str(error).startswith("get s3://b/some/key: ")
    assert "AKIDSECRET" not in str(error)


def test_missing_objects_read_like_file_not_found() -> None:
    assert str(translate_s3_error(client_error("NoSuchKey", 404), "get s3://b/k")) == (
        "get s3://b/k: no such object"
    )
    assert "no such bucket" in str(translate_s3_error(client_error("NoSuchBucket", 404), "x"))


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (FileNotFoundError(errno.ENOENT, "gone"), ObjectMissingError),
        (PermissionError(errno.EACCES, "denied"), CredentialError),
        (OSError(errno.ESTALE, "stale NFS handle"), TransientStoreError),
        (OSError(errno.EIO, "I/O error"), TransientStoreError),
        (OSError(errno.ENOSPC, "full"), StoreError),
    ],
)
def test_fs_errors_are_translated(exc: OSError, kind: type[StoreError]) -> None:
    assert type(translate_fs_error(exc, "read /shared/x")) is kind


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ambient AWS configuration: only what a test puts there."""
    for name in list(os.environ):
        if name.startswith("AWS_") and name != "AWS_CA_BUNDLE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path / "aws-credentials"


def test_resolve_credentials_without_any_is_a_credential_error(aws_env: Path) -> None:
    with pytest.raises(CredentialError, match="none found"):
        resolve_credentials()
    with pytest.raises(CredentialError, match="nope"):
        resolve_credentials("nope")


async def test_resolved_credentials_from_env_and_profile_work(
    aws_env: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    assert resolve_credentials() == s3_server.credentials()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    aws_env.write_text(
        f"[site]\naws_access_key_id = {s3_server.access_key}\n"
        f"aws_secret_access_key = {s3_server.secret_key}\n"
    )
    assert resolve_credentials("site") == s3_server.credentials()
    async with make_s3_store(s3_server, credentials=None, profile="site") as store:
        assert await listed(store, "no-such-prefix/") == {}


# --- filesystem specifics ------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "shared"
    (root / "data").mkdir(parents=True)
    (root / "data" / "in.txt").write_text("inside")
    outside = tmp_path / "secret.txt"
    outside.write_text("outside")
    (root / "data" / "escape").symlink_to(outside)
    (root / "data" / "alias").symlink_to(root / "data" / "in.txt")
    (root / "data" / "loop").symlink_to(root / "data", target_is_directory=True)
    return root


async def test_fs_list_skips_symlinks_leaving_root_and_symlinked_dirs(tree: Path) -> None:
    found = await listed(FsStore(tree), f"{tree}/data/")
    assert set(found) == {f"{tree}/data/in.txt", f"{tree}/data/alias"}
    assert found[f"{tree}/data/alias"].size == len("inside")


async def test_fs_lists_its_root_with_or_without_slash(tree: Path) -> None:
    store = FsStore(tree / "data")
    with_slash = await listed(store, f"{tree}/data/")
    assert set(with_slash) == {f"{tree}/data/in.txt", f"{tree}/data/alias"}
    assert await listed(store, f"{tree}/data") == with_slash


async def test_fs_refuses_escapes(tree: Path) -> None:
    store = FsStore(tree, retry=SMALL_POLICY)
    with pytest.raises(StoreError, match="symlink leads outside"):
        await store.head(f"{tree}/data/escape")
    with pytest.raises(StoreError, match=r"'\.\.'"):
        await store.head(f"{tree}/data/../data/in.txt")
    with pytest.raises(StoreError, match="outside the store's root"):
        await store.head("/etc/passwd")
    with pytest.raises(ValueError, match="absolute"):
        FsStore(Path("relative"))


async def test_fs_refs_name_the_file(tree: Path) -> None:
    ref = await FsStore(tree).head(f"{tree}/data/in.txt")
    stat = (tree / "data" / "in.txt").stat()
    assert ref == ObjectRef("file", "", f"{tree}/data/in.txt", str(stat.st_mtime_ns), 6)


async def test_fs_permission_denied_is_a_credential_error(tree: Path, scratch: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    locked = tree / "data" / "locked"
    locked.write_text("x")
    locked.chmod(0)
    store = FsStore(tree)
    ref = await store.head(str(locked))
    with pytest.raises(CredentialError, match="permission denied"):
        await fetch(store, ref, scratch)
