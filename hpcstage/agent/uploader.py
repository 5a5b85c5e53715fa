"""The agent's ``stage_out`` call: walk, compare, recycle, upload, verify, cache.

The rules (what is an output, when an object already is the file, recycle-bin names) are
``hpcstage.core.stageout``'s; a verified output is also kept in the node cache for later jobs.
A ``pack`` directive's outputs, walked the same way, become one new version of a packed
dataset instead (``agent/packout.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from hpcstage.agent.access import revoke_access
from hpcstage.agent.context import NodeContext
from hpcstage.agent.jobdir import JobDir, Owners, digests, same_file
from hpcstage.agent.packout import PackTarget, pack_out
from hpcstage.cache import PendingObject
from hpcstage.core import limits
from hpcstage.core.identity import ObjectRef
from hpcstage.core.stageout import Output, Refused, Skipped, same_object, trash_key
from hpcstage.errors import (
    CacheError,
    CredentialError,
    HpcstageError,
    StoreError,
    TransientStoreError,
)
from hpcstage.protocol.messages import (
    FileOutcome,
    StageOutItem,
    StageOutProgress,
    StageOutReply,
    StageOutRequest,
    StageOutResult,
)
from hpcstage.store.protocol import Described, UploadOptions
from hpcstage.store.recycle import UploadJournal, abort_own, replace
from hpcstage.store.s3 import S3Store

log = logging.getLogger("hpcstage.agent")

REPORT_EVERY = 0.5
FAILURES_NAMED = 3  # failed files a stage-out's error names (status lists them all)

Report = Callable[[StageOutProgress], None]


async def stage_out(ctx: NodeContext, request: StageOutRequest, progress: Report) -> StageOutReply:
    """Upload a finished job's outputs, one directive after the other; report every file."""
    # The job is over: its user loses access to the directory before we read it. A process
    # already holding a directory in it as its cwd keeps access there, so the reads do not
    # rely on this: they never follow a symlink and check each file on its fd (jobdir.py).
    await asyncio.to_thread(revoke_access, ctx.cache.jobs / request.job, request.user)
    ctx.stores.set_rates(request.rates)
    uploader = Uploader(
        ctx, request.job, request.user, request.ended_at, request.trash_prefix, progress
    )
    return StageOutReply(items=[await uploader.run(item) for item in request.items])


@dataclass
class _Report:
    """Per-file outcomes not yet sent to the daemon, and running totals."""

    request_id: int
    files: list[FileOutcome] = field(default_factory=list)
    files_done: int = 0
    bytes_done: int = 0
    files_total: int = 0
    bytes_total: int = 0
    uploaded: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, for the error message

    def add(self, outcome: FileOutcome) -> None:
        self.files.append(outcome)
        if outcome.state == "failed" and len(self.failures) < FAILURES_NAMED:
            self.failures.append(f"{outcome.path}: {outcome.error}")
        if outcome.state in ("uploaded", "present"):
            self.files_done += 1
            self.bytes_done += outcome.size
        self.uploaded += outcome.state == "uploaded"

    def flush(self) -> StageOutProgress:
        files, self.files = self.files, []
        return StageOutProgress(
            request_id=self.request_id,
            files=files,
            files_done=self.files_done,
            bytes_done=self.bytes_done,
            files_total=self.files_total,
            bytes_total=self.bytes_total,
            fetched=self.uploaded,
        )


@dataclass
class Uploader:
    """Stage-out of one job on this node."""

    ctx: NodeContext
    job: str
    user: str  # the job's user: whose files its outputs may be (agent/jobdir.py)
    ended_at: float
    trash_prefix: str
    progress: Report

    async def run(self, item: StageOutItem) -> StageOutResult:
        """Upload one directive's files; raise on a transient failure (the daemon retries)."""
        try:
            jobdir = await asyncio.to_thread(
                JobDir, self.ctx.cache.jobs / self.job, Owners.of(self.user)
            )
        except FileNotFoundError:
            jobdir = None  # the whole job directory is gone (the node's cache was wiped)
        try:
            return await self._run(jobdir, item)
        finally:
            if jobdir is not None:
                jobdir.close()

    async def _run(self, jobdir: JobDir | None, item: StageOutItem) -> StageOutResult:
        report = _Report(item.request_id)
        try:
            found = await asyncio.to_thread(_walk, jobdir, item)
        except HpcstageError as exc:
            absent = "does not exist" in str(exc)
            if not absent or not (item.optional or not item.job_completed):
                raise
            # Optional, or the job failed before writing it: nothing to keep, nothing lost.
            found = [Skipped(item.src, f"absent: {exc}")]
        outputs = [o for o in found if isinstance(o, Output)]
        for other in (s for s in found if not isinstance(s, Output)):
            state = "skipped" if isinstance(other, Skipped) else "failed"
            report.add(_outcome(other.rel, state, other.reason))
        report.files_total = len(outputs) + sum(isinstance(r, Refused) for r in found)
        report.bytes_total = sum(o.size for o in outputs)
        store = self.ctx.stores.s3(item.dest_bucket)
        journal = UploadJournal(self.ctx.cache.root / "uploads" / self.job, store.bucket)
        # What an earlier attempt of this stage-out left open; another job's uploads to the
        # same keys are not ours to abort.
        await abort_own(store, journal)
        written = ""
        if jobdir is not None:  # (else there are no outputs)
            await store.conditional_writes(f"{self.trash_prefix}.probe-{secrets.token_hex(8)}")
            if item.pack:
                written = await self._pack(store, jobdir, item, outputs, report, journal)
            else:
                await self._upload_all(store, jobdir, outputs, report, journal)
        journal.tidy()
        self.progress(report.flush())
        failed = report.files_total - report.files_done
        if failed:
            raise HpcstageError(
                f"{failed} of {report.files_total} outputs could not be uploaded: "
                + "; ".join(report.failures[:FAILURES_NAMED])
                + ("; ..." if failed > FAILURES_NAMED else "")
            )
        return StageOutResult(
            request_id=report.request_id,
            files_done=report.files_done,
            bytes_done=report.bytes_done,
            uploaded=report.uploaded,
            written=written,
        )

    async def _pack(
        self,
        store: S3Store,
        jobdir: JobDir,
        item: StageOutItem,
        outputs: list[Output],
        report: _Report,
        journal: UploadJournal,
    ) -> str:
        """Write the outputs as a new version of the packed dataset ``item.dest_key``
        (agent/packout.py); the version's URL ("": nothing to pack, no version written)."""
        if not outputs:  # an optional SRC that is absent, or empty: no empty version
            return ""
        uploads = self.ctx.cache.root / "uploads"
        for directory in (uploads, uploads / self.job):  # keys are nobody else's business
            directory.mkdir(mode=0o700, exist_ok=True)
        target = PackTarget(
            store,
            item.dest_key,
            item.writer,
            self.ended_at,
            uploads / self.job / f"pack-{item.request_id}",
            journal,
            source=f"stage-out of job {self.job}: {item.src}",
        )
        info = await pack_out(target, jobdir, outputs, report.add)
        return target.url(info.version)

    async def _upload_all(
        self,
        store: S3Store,
        jobdir: JobDir,
        outputs: list[Output],
        report: _Report,
        journal: UploadJournal,
    ) -> None:
        sem = asyncio.Semaphore(self.ctx.concurrency)
        reporter = asyncio.create_task(self._report_loop(report))

        async def one(output: Output) -> None:
            async with sem:
                report.add(await self._one(store, jobdir, output, journal))

        try:
            async with asyncio.TaskGroup() as group:
                for output in outputs:
                    group.create_task(one(output))
        except* TransientStoreError as eg:
            raise eg.exceptions[0] from None
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter

    async def _report_loop(self, report: _Report) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            self.progress(report.flush())

    async def _one(
        self, store: S3Store, jobdir: JobDir, output: Output, journal: UploadJournal
    ) -> FileOutcome:
        try:
            fd, opened = await asyncio.to_thread(jobdir.open, output.rel)
        except (HpcstageError, OSError) as exc:
            return _outcome_of(output, "failed", error=str(exc))
        try:
            return await self._send(store, _Source(fd, opened), output, journal)
        except (TransientStoreError, CredentialError):
            raise  # the whole stage-out is retried later (credentials: reported as failed)
        except (StoreError, HpcstageError, OSError) as exc:
            return _outcome_of(output, "failed", error=str(exc))
        finally:
            os.close(fd)

    async def _send(
        self,
        store: S3Store,
        source: _Source,
        output: Output,
        journal: UploadJournal,
    ) -> FileOutcome:
        """Compare, recycle, upload and cache the output open as ``source``: every byte read
        for it comes from that one fd, the one its checks were made on (jobdir.py)."""
        source.check_unchanged(output.size)
        md5, sha = await asyncio.to_thread(digests, source.fd)
        existing = await store.describe(output.key)
        if existing is not None and _holds(existing, output, md5, sha):
            await self._cache(store, source, existing.ref, sha)
            return _outcome_of(output, "present")  # arrived in an earlier run: exactly once
        if self.ctx.fence is not None:  # nothing more to the store for a superseded leader
            await asyncio.to_thread(self.ctx.fence.check)
        # Whatever the key holds goes to the bin first, each version under its own name,
        # and is only written over while it is still there (hpcstage.store.recycle).
        placed = await replace(
            store,
            output.key,
            existing,
            lambda v: trash_key(self.trash_prefix, self.ended_at, self.job, v.key, v.etag),
            lambda only_if: store.upload_fd(
                source.fd, output.key, options=UploadOptions(only_if, journal, sha)
            ),
            lambda now: _holds(now, output, md5, sha),
        )
        _verify(placed.ref, output)
        try:
            source.check_unchanged(output.size)  # what was sent is what was hashed
            await self._cache(store, source, placed.ref, sha)
        except (HpcstageError, OSError) as exc:  # the report keeps where the old object went
            return _outcome_of(output, "failed", str(exc), trash_key=placed.trash_key)
        return _outcome_of(output, "uploaded", trash_key=placed.trash_key)

    async def _cache(self, store: S3Store, source: _Source, ref: ObjectRef, sha: str) -> None:
        """Keep the verified output as an ordinary (unleased) cache entry for later jobs."""

        async def copy_in(pending: PendingObject) -> str:
            return await asyncio.to_thread(_copy_verified, source, pending.fd, sha)

        try:
            await self.ctx.cache.ensure(ref, copy_in)
        except HpcstageError as exc:  # the upload stands; caching is only an optimisation
            log.warning("output %s uploaded but not cached: %s", store.url(ref.key), exc)


@dataclass(frozen=True)
class _Source:
    """An output open for stage-out, and its fstat when it was opened and checked."""

    fd: int
    opened: os.stat_result

    def check_unchanged(self, listed_size: int) -> None:
        """HpcstageError if the file was written to since it was listed and opened."""
        now = os.fstat(self.fd)
        if now.st_size != listed_size or not same_file(self.opened, now):
            raise HpcstageError(
                "it changed while it was being staged out (written to after the job ended)"
            )


def _walk(jobdir: JobDir | None, item: StageOutItem) -> list[Output | Skipped | Refused]:
    if jobdir is None:
        raise HpcstageError(
            f"stage-out source {item.src} does not exist: the job directory is gone"
        )
    # The job's limits on files and bytes, checked as the walk goes (before any upload).
    bound = limits.OutputLimit(item.max_files, item.max_bytes, item.limit_reason)
    walked = jobdir.walk(PurePosixPath(item.src), item.dest_key)
    return list(bound.bounded(walked, _entry_size))


def _entry_size(entry: Output | Skipped | Refused) -> int:
    return entry.size if isinstance(entry, Output) else 0


def _outcome(rel: str, state: str, error: str) -> FileOutcome:
    """A per-file report for something that is not uploaded."""
    return FileOutcome(path=rel, key="", size=0, state=state, error=error, trash_key="")


def _outcome_of(output: Output, state: str, error: str = "", trash_key: str = "") -> FileOutcome:
    """The per-file report of an output."""
    return FileOutcome(output.rel, output.key, output.size, state, error, trash_key)


def _holds(stored: Described, output: Output, md5: str, sha: str) -> bool:
    """True when the object at the output's key already is the file (see same_object)."""
    ref = stored.ref
    return same_object(
        ref.etag,
        ref.size,
        md5,
        output.size,
        etag_is_md5=stored.etag_is_md5,
        stored_sha256=stored.sha256,
        sha256_hex=sha,
    )


def _verify(ref: ObjectRef, output: Output) -> None:
    # The content was checked by the store (Content-MD5 of every request, and the MD5 ETag of
    # a single PUT where it is one, see S3Store.upload); the size is checked here.
    if ref.size != output.size:
        raise TransientStoreError(
            f"{output.key}: store holds {ref.size} bytes after upload, expected {output.size}"
        )


def _copy_verified(source: _Source, dest: int, sha: str) -> str:
    """Copy the output into the cache's pending file; its SHA-256, which must be ``sha``
    (the digest of the bytes that were uploaded and verified): else CacheError."""
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(source.fd, 1 << 20, offset):
        os.pwrite(dest, chunk, offset)
        digest.update(chunk)
        offset += len(chunk)
    if digest.hexdigest() != sha or not same_file(source.opened, os.fstat(source.fd)):
        raise CacheError("the file changed after it was uploaded: not cached")
    return sha
