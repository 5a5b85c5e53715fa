"""The agent's ``stage`` call: list a source, fetch what the cache lacks, link the job's view.

Downloads are bounded (``concurrency`` at a time, more objects in flight waiting for their
group commit); the first failure cancels the rest, because a job must never start with part
of its inputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hpcstage.agent import packed
from hpcstage.agent.access import grant_access
from hpcstage.agent.context import NodeContext
from hpcstage.agent.permissions import Person, Reader
from hpcstage.cache import PendingObject, key_dest
from hpcstage.cache.commit import GROUP_COMMIT_MAX
from hpcstage.core import limits
from hpcstage.core.directives import SourceKind, quoted
from hpcstage.core.filters import KeyFilter
from hpcstage.core.identity import ObjectRef
from hpcstage.core.units import format_size
from hpcstage.errors import CacheError, HpcstageError, QuotaError
from hpcstage.protocol.messages import (
    PIN_JOB_PREFIX,
    SourceSpec,
    StageItem,
    StageProgress,
    StageReply,
    StageRequest,
)
from hpcstage.store.protocol import ObjectStore
from hpcstage.store.s3 import download_bytes

PROGRESS_EVERY = 0.5  # seconds between progress messages per call
# Objects in flight per input beyond the `concurrency` downloads: PIPELINE per download slot,
# at most PIPELINE_MAX (each holds its bytes, or an open temp file, until its group commits).
PIPELINE = 3
PIPELINE_MAX = 448
SMALL_OBJECT = GROUP_COMMIT_MAX  # objects up to this size are fetched into memory

Report = Callable[[StageProgress], None]


@dataclass
class Counters:
    """Progress of one request on this node."""

    files_done: int = 0
    bytes_done: int = 0
    files_total: int | None = None
    bytes_total: int | None = None
    fetched: int = 0
    fetched_bytes: int = 0
    listed_files: int = 0
    listed_bytes: int = 0

    def progress(self, request_id: int) -> StageProgress:
        return StageProgress(
            request_id=request_id,
            files_done=self.files_done,
            bytes_done=self.bytes_done,
            files_total=self.files_total,
            bytes_total=self.bytes_total,
            fetched=self.fetched,
            fetched_bytes=self.fetched_bytes,
        )


async def stage(ctx: NodeContext, request: StageRequest, progress: Report) -> StageReply:
    """Fetch every item into the cache and link it into the job's view.

    Without ``view`` (a warmup) the objects are only cached: no view is built, so warming
    10^8 files costs no 10^8 links to make and then remove.
    """
    ctx.stores.set_rates(request.rates)
    job: str | None = None
    view, acl = "", False
    if request.view:
        job = request.job
        view = str(ctx.cache.view_dir(job))
        acl = await asyncio.to_thread(grant_access, Path(view), request.user)
    stager = _Stager(ctx, job, request.user, progress)
    results = [await stager.item_checked(item) for item in request.items]
    return StageReply(view=view, acl=acl, items=results)


@dataclass
class _Stager:
    """One ``stage`` call's inputs, staged one after the other for one job (or a warmup)."""

    ctx: NodeContext
    job: str | None  # None: cache only (a warmup)
    user: str
    progress: Report

    async def item_checked(self, item: StageItem) -> StageProgress:
        result = await self._item(item)
        if result.files_total == 0:
            # A typo in a prefix must not look like an empty, successfully staged input.
            raise HpcstageError(f"no objects under {item.source.url()}")
        return result

    async def _item(self, item: StageItem) -> StageProgress:
        counters = Counters()
        if item.source.kind is SourceKind.S3_PACKED:
            # Materialised once per node, attached in O(1) (agent/packed.py).
            reporter = asyncio.create_task(_report(self.progress, counters, item.request_id))
            try:
                await packed.stage_packed(self.ctx, item, self.job, self.user, counters)
            finally:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
            return counters.progress(item.request_id)
        dest = PurePosixPath(item.dest)
        store, prefix, is_prefix = self._open_store(item.source)
        listed = _refs(store, prefix, is_prefix, counters, item.source)
        # Filtered before the budget: an object a filter leaves out is neither counted nor
        # fetched.
        refs = _limited(_taken(listed, prefix, item.source.key_filter()), item)
        if item.source.kind is SourceKind.PATH and self.job is not None:
            refs = await self._as_user(refs, item.source.path, prefix if is_prefix else None)
        reporter = asyncio.create_task(_report(self.progress, counters, item.request_id))
        try:
            await self._fetch_all(refs, prefix if is_prefix else None, dest, store, counters)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        self.progress(counters.progress(item.request_id))
        return counters.progress(item.request_id)

    async def _fetch_all(
        self,
        refs: AsyncIterator[ObjectRef],
        prefix: str | None,
        dest: PurePosixPath,
        store: ObjectStore,
        counters: Counters,
    ) -> None:
        concurrency = self.ctx.concurrency
        # A bounded queue keeps the listing streamed: 10^6 keys never sit in memory at once.
        queue: asyncio.Queue[ObjectRef | None] = asyncio.Queue(maxsize=concurrency * 4)
        # `concurrency` downloads at a time; more objects than that in flight, so that while
        # finished ones wait for their group commit and link the connections stay busy.
        slots = asyncio.Semaphore(concurrency)
        workers = [
            asyncio.create_task(self._worker(queue, prefix, dest, store, counters, slots))
            for _ in range(concurrency + min(concurrency * PIPELINE, PIPELINE_MAX))
        ]
        producer = asyncio.create_task(_produce(refs, queue, len(workers), counters))
        try:
            # The first failure (a missing object, refused credentials) cancels the rest:
            # a job must never start with part of its inputs.
            await _gather_or_cancel([producer, *workers])
        finally:
            await _cancel_all([producer, *workers])

    async def _worker(
        self,
        queue: asyncio.Queue[ObjectRef | None],
        prefix: str | None,
        dest: PurePosixPath,
        store: ObjectStore,
        counters: Counters,
        slots: asyncio.Semaphore,
    ) -> None:
        cache = self.ctx.cache
        while (ref := await queue.get()) is not None:
            # Checked also without a view: a warmup reports a key no job could use, as the
            # job would.
            target = _view_path(ref, prefix, dest)
            for attempt in range(3):
                fetcher = _Fetcher(store, ref, counters, slots)
                if ref.size <= SMALL_OBJECT:
                    obj = await cache.ensure_small(ref, fetcher.read)
                else:
                    obj = await cache.ensure(ref, fetcher)
                if self.job is None:  # cache only (a warmup)
                    break
                try:
                    await cache.link_async(self.job, target, obj)
                    break
                except CacheError:
                    # Evicted between ensure and link (rare): fetch again, then give up.
                    if attempt == 2 or cache.lookup(ref) is not None:
                        raise
            counters.files_done += 1
            counters.bytes_done += ref.size

    async def _as_user(
        self, refs: AsyncIterator[ObjectRef], path: str, prefix: str | None
    ) -> AsyncIterator[ObjectRef]:
        """A shared path is read as the service account, so checked as the job's user first
        (docs/security.md). A warmup (no job) only fills the cache, which no user reads: a
        job's staging checks again. An admin's kept-warm dataset has no user and no check:
        its view gets no user's ACL entry. Any other staging without a user is refused."""
        if not self.user:
            if self.job is not None and self.job.startswith(PIN_JOB_PREFIX):
                return refs
            raise HpcstageError(
                f"job {self.job}: no user to check the shared path {path} as (only a kept-warm"
                " dataset is staged for nobody)"
            )
        reader = Reader(await asyncio.to_thread(Person.named, self.user))
        return _readable(refs, reader, prefix)

    def _open_store(self, source: SourceSpec) -> tuple[ObjectStore, str, bool]:
        """The store holding ``source``, the key or prefix to read, and whether it is a prefix."""
        if source.kind is SourceKind.PATH:
            path = os.path.normpath(source.path)
            if os.path.realpath(path) != path:
                # The policy allowed the path as written; a symlink must not lead elsewhere.
                raise HpcstageError(
                    f"{path} leads through a symlink to "
                    f"{os.path.realpath(path)}: name the real path"
                )
            is_dir = os.path.isdir(path)
            store: ObjectStore = self.ctx.stores.files(path if is_dir else os.path.dirname(path))
            return store, (path.rstrip("/") + "/") if is_dir else path, is_dir
        store = self.ctx.stores.s3(source.bucket)
        return store, source.key, source.kind is SourceKind.S3_PREFIX


async def _refs(
    store: ObjectStore, key: str, is_prefix: bool, counters: Counters, source: SourceSpec
) -> AsyncIterator[ObjectRef]:
    if not is_prefix:
        ref = await store.head(key, version_id=source.version_id)
        counters.files_total, counters.bytes_total = 1, ref.size
        yield ref
        return
    async for ref in store.list(key):
        yield ref


async def _taken(
    refs: AsyncIterator[ObjectRef], prefix: str, key_filter: KeyFilter
) -> AsyncIterator[ObjectRef]:
    """``refs`` whose key after ``prefix`` the source's include/exclude globs take."""
    async for ref in refs:
        if not key_filter or key_filter.takes(ref.key[len(prefix) :]):
            yield ref


async def _readable(
    refs: AsyncIterator[ObjectRef], reader: Reader, top: str | None
) -> AsyncIterator[ObjectRef]:
    """``refs``, each checked readable by the reader's person (PermissionRefused if not)."""
    if top is not None:
        await asyncio.to_thread(reader.check_dir, top.rstrip("/") or "/")
    async for ref in refs:
        await asyncio.to_thread(reader.check_file, ref.key, top)
        yield ref


async def _limited(refs: AsyncIterator[ObjectRef], item: StageItem) -> AsyncIterator[ObjectRef]:
    """Stop the listing as soon as the input outgrows its budget in bytes or objects (before
    fetching that much)."""
    total = count = 0
    async for ref in refs:
        total, count = total + ref.size, count + 1
        if item.max_bytes is not None and total > item.max_bytes:
            raise QuotaError(
                f"over quota: this input needs more than {format_size(item.max_bytes)}"
                f" and {item.quota_reason}"
            )
        if item.max_objects is not None and count > item.max_objects:
            raise limits.too_many_objects(item.max_objects, item.objects_reason)
        yield ref


async def _produce(
    refs: AsyncIterator[ObjectRef],
    queue: asyncio.Queue[ObjectRef | None],
    workers: int,
    counters: Counters,
) -> None:
    async for ref in refs:
        counters.listed_files += 1
        counters.listed_bytes += ref.size
        await queue.put(ref)
    # The listing is complete: totals are now known exactly.
    counters.files_total, counters.bytes_total = counters.listed_files, counters.listed_bytes
    for _ in range(workers):
        await queue.put(None)


@dataclass
class _Fetcher:
    """Download one object into the cache's pending file; counts GETs this request caused."""

    store: ObjectStore
    ref: ObjectRef
    counters: Counters
    slots: asyncio.Semaphore

    async def __call__(self, pending: PendingObject) -> str:
        self.counters.fetched += 1  # called only by the one fetch that singleflight runs
        async with self.slots:
            result = await self.store.download(self.ref, pending.fd)
        self.counters.fetched_bytes += self.ref.size
        return str(result.sha256_hex)

    async def read(self) -> tuple[bytes, str]:
        """The object's bytes in memory (small objects; see NodeCache.ensure_small)."""
        self.counters.fetched += 1
        async with self.slots:
            data = await download_bytes(self.store, self.ref)
        self.counters.fetched_bytes += self.ref.size
        return data


def _view_path(ref: ObjectRef, prefix: str | None, dest: PurePosixPath) -> PurePosixPath:
    """Where ``ref`` appears in the job's view; hostile keys are refused before any fetch."""
    if prefix is None:
        return dest
    if not ref.key.startswith(prefix):
        # The policy allowed this prefix, not the bucket: a key outside it comes from a store
        # that lists wrongly (or matches prefixes after folding case or Unicode form).
        raise CacheError(
            f"object key {quoted(ref.key, 200)} is not under the prefix {quoted(prefix, 200)}"
            " that was listed"
        )
    return key_dest(dest, ref.key[len(prefix) :], ref.key)


async def _report(progress: Report, counters: Counters, request_id: int) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY)
        progress(counters.progress(request_id))


async def _gather_or_cancel(tasks: list[asyncio.Task[None]]) -> None:
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    if pending:
        await asyncio.gather(*pending)


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
