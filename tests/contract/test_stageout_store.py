"""Stage-out's recycle-bin rule and restore against both S3 servers (rclone's and moto's).

Nothing at a key is overwritten without a copy of that version in the recycle bin: not when a
retry finds the key rewritten by someone else, not when someone writes between the copy and
the PUT, not when two stage-outs write one key; and a retried stage-out of a big (multipart)
output finds it in place instead of filing it in the bin. The uploader runs as on a node
(hpcstage.agent.uploader.Uploader, a real node cache), without Slurm: a failure at a chosen
step comes from a store with one method overridden, so each race is deterministic.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.exceptions as bce
import pytest
from hostile_s3 import HostileS3, Mode  # tests/: on sys.path, above the contract package

from hpcstage.agent.uploader import Uploader
from hpcstage.cache import NodeCache
from hpcstage.errors import ObjectChangedError, TransientStoreError
from hpcstage.protocol.messages import FileOutcome, StageOutItem, StageOutResult
from hpcstage.staging import trash
from hpcstage.store.protocol import MIB, Precondition, UploadOptions
from hpcstage.store.s3 import S3Store
from hpcstage.store.s3_errors import translate_s3_error

from .conftest import BUCKET, SMALL_POLICY, S3Server, make_s3_store, open_uploads

pytestmark = pytest.mark.anyio

TRASH = ".hpcstage-trash/"
ENDED = 1_780_000_000.0  # a fixed job end: the recycle-bin day folder is known


@dataclass
class Node:
    """What the uploader uses of its node context: a node cache, a store, a concurrency."""

    cache: NodeCache
    store: S3Store
    concurrency: int = 4
    fence: None = None  # not fenced: no leader epoch (an agent started by hand)

    @property
    def stores(self) -> Node:
        return self

    def s3(self, bucket: str) -> S3Store:
        assert bucket == BUCKET
        return self.store


@dataclass
class Run:
    """One job's stage-out of ``out/`` to ``prefix`` on one node, repeatable (a retry)."""

    node: Node
    job: str
    prefix: str
    files: list[FileOutcome] = field(default_factory=list)
    stores: list[S3Store] = field(default_factory=list)  # closed after the test

    def write(self, name: str, data: bytes) -> None:
        path = self.node.cache.jobs / self.job / "out" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    async def stage_out(self, store: S3Store | None = None) -> StageOutResult:
        if store is not None:
            self.stores.append(store)
            self.node.store = store
        uploader = Uploader(
            self.node,  # type: ignore[arg-type]  # the parts of a NodeContext it uses
            self.job,
            pwd.getpwuid(os.getuid()).pw_name,  # the files' owner: the job's user
            ENDED,
            TRASH,
            lambda report: self.files.extend(report.files),
        )
        item = StageOutItem(
            request_id=1,
            src="out",
            dest_bucket=BUCKET,
            dest_key=self.prefix,
            optional=False,
            job_completed=True,
            max_files=None,
            max_bytes=None,
            limit_reason="",
            pack=False,
            writer="",
        )
        # A task of its own, as the agent gives each request: Python 3.11's TaskGroup leaves
        # its caller's cancel count raised after a child failed, which anyio takes for a
        # cancellation of the test.
        return await asyncio.create_task(uploader.run(item))


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[NodeCache]:
    made = NodeCache(tmp_path / "cache")
    yield made
    made.close()  # its index's SQLite connection (Python 3.13 warns of one left open)


@pytest.fixture
async def run(any_s3_server: S3Server, cache: NodeCache) -> AsyncIterator[Run]:
    store = make_s3_store(any_s3_server)
    prefix = f"so-{uuid.uuid4().hex[:10]}/"
    made = Run(Node(cache, store), str(int(time.time() * 1000) % 10**9), prefix, stores=[store])
    try:
        yield made
    finally:
        for each in made.stores:
            await each.close()


@pytest.fixture
async def other(any_s3_server: S3Server) -> AsyncIterator[S3Store]:
    """Someone else writing to the same bucket."""
    async with make_s3_store(any_s3_server) as store:
        yield store


async def put(store: S3Store, key: str, data: bytes, tmp: Path) -> None:
    source = tmp / f"put-{uuid.uuid4().hex}"
    source.write_bytes(data)
    await store.upload(source, key)


async def read(store: S3Store, key: str) -> bytes:
    client = await store._bucket.client()
    answer = await client.get_object(Bucket=BUCKET, Key=key)
    async with answer["Body"] as body:
        data: bytes = await body.read()
        return data


async def bin_of(store: S3Store, job: str) -> list[bytes]:
    """The contents of every recycle-bin entry of ``job``."""
    found = []
    async for ref in store.list(TRASH):
        if f"/{job}/" in ref.key or f"/{job}~" in ref.key:
            found.append(await read(store, ref.key))
    return sorted(found)


async def fails_transiently(attempt: Awaitable[Any]) -> None:
    """``attempt`` raises TransientStoreError (the uploader's task group may wrap it)."""
    with pytest.raises(Exception) as raised:  # noqa: PT011 (checked just below)
        await attempt
    assert _transient(raised.value), raised.value


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_transient(e) for e in exc.exceptions)
    return isinstance(exc, TransientStoreError)


class FailFirstUpload(S3Store):
    """A store whose first upload fails after the recycle-bin copy (a flaky network)."""

    failed = False

    async def upload_fd(self, fd: int, key: str, **options: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise TransientStoreError(f"put {key}: connection reset (injected)")
        return await super().upload_fd(fd, key, **options)


class WriterBeforePut(S3Store):
    """A store where someone else writes ``data`` to the key right before our first PUT."""

    other: S3Store
    data: bytes
    tmp: Path
    done = False

    async def upload_fd(self, fd: int, key: str, **options: Any) -> Any:
        if not self.done:
            self.done = True
            await put(self.other, key, self.data, self.tmp)
        return await super().upload_fd(fd, key, **options)


async def test_a_retry_keeps_the_version_someone_wrote_after_the_first_attempt(
    run: Run, other: S3Store, any_s3_server: S3Server, tmp_path: Path
) -> None:
    # Attempt 1 copies O to the bin and fails; N is written; the retry must bin N too.
    key = run.prefix + "table.csv"
    await put(other, key, b"O: last month's table\n", tmp_path)
    run.write("table.csv", b"the job's table\n")
    flaky = make_s3_store(any_s3_server, FailFirstUpload)
    await fails_transiently(run.stage_out(flaky))
    await put(other, key, b"N: written by someone else in between\n", tmp_path)
    await run.stage_out(make_s3_store(any_s3_server))
    assert await read(other, key) == b"the job's table\n"
    assert await bin_of(other, run.job) == [
        b"N: written by someone else in between\n",
        b"O: last month's table\n",
    ]


async def test_a_writer_between_the_bin_copy_and_the_put_is_kept_too(
    run: Run, other: S3Store, any_s3_server: S3Server, tmp_path: Path
) -> None:
    # HEAD sees O, O goes to the bin, N lands, then our PUT: it must not replace N unseen.
    key = run.prefix + "table.csv"
    await put(other, key, b"O\n", tmp_path)
    run.write("table.csv", b"mine\n")
    racing = make_s3_store(any_s3_server, WriterBeforePut)
    racing.other, racing.data, racing.tmp = other, b"N\n", tmp_path
    await run.stage_out(racing)
    assert await read(other, key) == b"mine\n"
    assert await bin_of(other, run.job) == [b"N\n", b"O\n"]
    assert run.files[-1].trash_key.endswith(f"/{key}")


async def test_a_stage_out_aborts_no_other_writers_multipart_upload(
    run: Run, any_s3_server: S3Server, tmp_path: Path
) -> None:
    key = run.prefix + "big.bin"
    client = await run.node.store._bucket.client()
    theirs = await client.create_multipart_upload(Bucket=BUCKET, Key=key)  # another job's
    run.write("big.bin", b"x" * 1000)
    await run.stage_out()
    still = await open_uploads(any_s3_server, run.prefix)
    assert (key, theirs["UploadId"]) in still
    await client.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=theirs["UploadId"])


class PausedAfterCreate(S3Store):
    """A store whose first multipart upload waits, open, before its first part is sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reached, self.gate = asyncio.Event(), asyncio.Event()

    async def _put_part_once(self, *args: Any) -> str:
        if not self.gate.is_set():
            self.reached.set()
            await self.gate.wait()
        return await super()._put_part_once(*args)


async def test_two_stage_outs_to_one_key_neither_aborts_the_others_upload(
    run: Run, other: S3Store, any_s3_server: S3Server, tmp_path: Path
) -> None:
    # Job A's multipart upload is open when job B's stage-out to the same key starts and
    # finishes; A then finds B's object there: it bins it and writes again. Nothing is lost.
    key = run.prefix + "big.bin"
    await put(other, key, b"O\n", tmp_path)
    job_b = Run(run.node, run.job + "b", run.prefix)
    run.write("big.bin", _payload(6 * MIB, b"A"))
    job_b.write("big.bin", _payload(6 * MIB, b"B"))
    paused = make_s3_store(any_s3_server, PausedAfterCreate)
    first = asyncio.create_task(run.stage_out(paused))
    await paused.reached.wait()
    await job_b.stage_out(make_s3_store(any_s3_server))
    run.stores += job_b.stores
    paused.gate.set()
    await first
    assert await read(other, key) == _payload(6 * MIB, b"A")
    assert await bin_of(other, run.job) == sorted([b"O\n", _payload(6 * MIB, b"B")])
    assert await bin_of(other, job_b.job) == [b"O\n"]
    assert await open_uploads(any_s3_server, run.prefix) == []


class NoAbort(S3Store):
    """A store whose first multipart upload fails and is not aborted (the agent was killed)."""

    failed = False

    async def _complete(self, *args: Any) -> None:
        if not self.failed:
            self.failed = True
            raise TransientStoreError("complete: connection reset (injected)")
        await super()._complete(*args)

    async def abort(self, key: str, upload_id: str) -> bool:
        if self.failed and not getattr(self, "aborted_once", False):
            self.aborted_once = True  # the kill: this abort never happens
            return False
        return await super().abort(key, upload_id)


async def test_a_retry_aborts_the_uploads_its_crashed_attempt_left_and_only_those(
    run: Run, any_s3_server: S3Server
) -> None:
    key = run.prefix + "big.bin"
    run.write("big.bin", _payload(6 * MIB))
    crashing = make_s3_store(any_s3_server, NoAbort)
    await fails_transiently(run.stage_out(crashing))
    left = await open_uploads(any_s3_server, run.prefix)
    assert [k for k, _ in left] == [key]
    client = await crashing._bucket.client()
    theirs = await client.create_multipart_upload(Bucket=BUCKET, Key=key)
    await run.stage_out(make_s3_store(any_s3_server))
    assert await open_uploads(any_s3_server, run.prefix) == [(key, theirs["UploadId"])]
    await client.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=theirs["UploadId"])


async def test_a_retried_stage_out_of_a_multipart_output_finds_it_in_place(
    run: Run, other: S3Store
) -> None:
    # On AWS semantics (moto) a multipart object's ETag is "<md5 of part md5s>-N": no MD5 of
    # the file; the retry must still see its own upload, not re-upload it and bin it.
    data = _payload(6 * MIB)  # above the suite's 5 MiB threshold: two parts
    run.write("big.bin", data)
    first = await run.stage_out()
    second = await run.stage_out()
    assert (first.uploaded, second.uploaded) == (1, 0)
    assert [f.state for f in run.files] == ["uploaded", "present"]
    assert await bin_of(other, run.job) == []
    assert await read(other, run.prefix + "big.bin") == data


async def test_objects_under_sse_kms_are_not_judged_by_their_etag(
    any_s3: S3Store, tmp_path: Path
) -> None:
    # Under SSE-KMS (and SSE-C) an ETag looks like an MD5 and is not one; both servers echo
    # the encryption header, so the store says the ETag cannot be compared.
    client = await any_s3._bucket.client()
    key = f"kms-{uuid.uuid4().hex[:8]}"
    await client.put_object(Bucket=BUCKET, Key=key, Body=b"secret", ServerSideEncryption="aws:kms")
    await client.put_object(Bucket=BUCKET, Key=key + "-plain", Body=b"open")
    described = await any_s3.describe(key)
    plain = await any_s3.describe(key + "-plain")
    assert described is not None and plain is not None
    assert (described.etag_is_md5, plain.etag_is_md5) == (False, True)


# --- restore ---------------------------------------------------------------------------------


async def test_two_restores_in_one_second_keep_both_displaced_versions(
    any_s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trash.time, "time", lambda: ENDED)  # both within the same second
    key = f"rs-{uuid.uuid4().hex[:8]}/table.csv"
    day = time.strftime("%Y-%m-%d", time.gmtime(ENDED))
    first, second = f"{TRASH}{day}/101/{key}", f"{TRASH}{day}/102/{key}"
    await put(any_s3, key, b"C: current\n", tmp_path)
    await put(any_s3, first, b"A: kept by job 101\n", tmp_path)
    await put(any_s3, second, b"B: kept by job 102\n", tmp_path)
    done_a = await trash.restore(any_s3, TRASH, first)
    done_b = await trash.restore(any_s3, TRASH, second)
    assert await read(any_s3, key) == b"B: kept by job 102\n"
    assert done_a["displaced_to"] != done_b["displaced_to"]
    assert await read(any_s3, done_a["displaced_to"]) == b"C: current\n"
    assert await read(any_s3, done_b["displaced_to"]) == b"A: kept by job 101\n"


def _payload(size: int, seed: bytes = b"stage-out") -> bytes:
    block = hashlib.sha256(seed).digest() * 4096
    return (block * (size // len(block) + 1))[:size]


# --- conditional writes ---------------------------------------------------------------------


async def test_conditional_writes_are_probed_rclone_ignores_them_moto_honours_them(
    any_s3_server: S3Server, any_s3: S3Store
) -> None:
    probe = f"{TRASH}.probe-{uuid.uuid4().hex[:8]}"
    assert await any_s3.conditional_writes(probe) is (any_s3_server.kind == "moto")
    assert await any_s3.head_or_none(probe) is None  # the probe leaves nothing behind


@pytest.mark.parametrize("size", [100, 6 * MIB], ids=["single-put", "multipart"])
async def test_a_write_on_a_stale_condition_is_refused_on_both_servers(
    any_s3_server: S3Server, any_s3: S3Store, other: S3Store, tmp_path: Path, size: int
) -> None:
    # Honoured headers (moto) or a HEAD right before the write (rclone): either way a write
    # that expected what is no longer there writes nothing.
    await any_s3.conditional_writes(f"{TRASH}.probe-{uuid.uuid4().hex[:8]}")
    key = f"cond-{uuid.uuid4().hex[:8]}/k"
    await put(other, key, b"seen", tmp_path)
    seen = await any_s3.head(key)
    await put(other, key, b"written since", tmp_path)
    source = tmp_path / "mine"
    source.write_bytes(_payload(size))
    with pytest.raises(ObjectChangedError):
        await any_s3.upload(source, key, options=UploadOptions(only_if=Precondition(seen.etag)))
    expected_none = UploadOptions(only_if=Precondition())  # expected no object
    with pytest.raises(ObjectChangedError):
        await any_s3.upload(source, key, options=expected_none)
    assert await read(other, key) == b"written since"
    assert await open_uploads(any_s3_server, key) == []
    fresh = await any_s3.upload(
        source, key, options=UploadOptions(only_if=Precondition((await any_s3.head(key)).etag))
    )
    assert fresh.size == size


class NoConditionalComplete(S3Store):
    """A server that honours conditional PUTs but answers 501 to a conditional Complete."""

    refused = 0

    async def _complete(self, key: str, upload_id: str, etags: Any, condition: Any) -> None:
        if condition:
            self.refused += 1
            answer = {"Error": {"Code": "NotImplemented", "Message": "If-None-Match"}}
            answer["ResponseMetadata"] = {"HTTPStatusCode": 501}
            error = bce.ClientError(answer, "CompleteMultipartUpload")
            raise translate_s3_error(error, f"complete multipart {key}") from error
        await super()._complete(key, upload_id, etags, condition)


async def test_a_store_without_conditional_complete_falls_back_to_the_head(
    moto_server: S3Server, tmp_path: Path
) -> None:
    store = make_s3_store(moto_server, NoConditionalComplete)
    try:
        assert await store.conditional_writes(f"{TRASH}.probe-{uuid.uuid4().hex[:8]}")
        source = tmp_path / "big"
        source.write_bytes(_payload(6 * MIB))
        for name in ("a", "b"):
            ref = await store.upload(
                source,
                f"nc-{uuid.uuid4().hex[:8]}/{name}",
                options=UploadOptions(only_if=Precondition()),
            )
            assert ref.size == 6 * MIB
        assert store.refused == 1  # asked once, then remembered
    finally:
        await store.close()


# --- SSE-KMS ETags on the way in -------------------------------------------------------------


async def test_sse_kms_objects_are_staged_in_without_taking_their_etag_for_an_md5() -> None:
    # AWS gives an SSE-KMS object an ETag of 32 hex digits that is not the MD5 of its bytes
    # (moto does not emulate that, the hostile test server does). Such an object is checked
    # by its size, its ETag staying the same and the store's checksum if any, not the ETag.
    server = HostileS3()
    await server.start()
    small, mid, plain = _payload(100 * 1024, b"s"), _payload(2 * MIB, b"m"), b"plain"
    server.put("b", "p/small", small, Mode.SSE_KMS)
    server.put("b", "p/mid", mid, Mode.SSE_KMS)  # above LEAN_MAX: a HEAD first, then the SDK
    server.put("b", "p/plain", plain)
    credentials = {"access_key": "x", "secret_key": "y", "token": ""}
    store = S3Store(server.endpoint, "b", credentials=credentials, retry=SMALL_POLICY)
    try:
        refs = {ref.key: ref async for ref in store.list("p/")}
        got = {key: await _download(store, ref) for key, ref in sorted(refs.items())}
    finally:
        await store.close()
        await server.stop()
    assert got == {"p/mid": (mid, ""), "p/plain": (plain, "md5"), "p/small": (small, "")}


async def _download(store: S3Store, ref: Any) -> tuple[bytes, str]:
    fd = os.memfd_create("sse", os.MFD_CLOEXEC)
    try:
        result = await store.download(ref, fd)
        return os.pread(fd, ref.size, 0), result.verified
    finally:
        os.close(fd)
