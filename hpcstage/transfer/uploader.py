"""The agent's side of stage-out: walk, compare, recycle, upload, verify, cache. See stageout.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from hpcstage.cache import PendingObject
from hpcstage.errors import CredentialError, HpcstageError, StoreError, TransientStoreError
from hpcstage.identity import ObjectRef
from hpcstage.recycle import UploadJournal, abort_own, replace
from hpcstage.stageout import Output, Skipped, file_digests, same_object, trash_key, walk
from hpcstage.store import Described, S3Store
from hpcstage.transfer.rpc import ProgressFn

if TYPE_CHECKING:
    from hpcstage.transfer.agent import Agent

log = logging.getLogger("hpcstage.agent")

REPORT_EVERY = 0.5


@dataclass
class _Report:
    """Per-file outcomes not yet sent to the daemon, and running totals."""

    request_id: int
    files: list[dict[str, Any]] = field(default_factory=list)
    files_done: int = 0
    bytes_done: int = 0
    files_total: int = 0
    bytes_total: int = 0
    uploaded: int = 0

    def add(self, outcome: dict[str, Any]) -> None:
        self.files.append(outcome)
        if outcome["state"] in ("uploaded", "present"):
            self.files_done += 1
            self.bytes_done += int(outcome["size"])
        self.uploaded += outcome["state"] == "uploaded"

    def flush(self) -> dict[str, Any]:
        files, self.files = self.files, []
        return {
            "request_id": self.request_id,
            "files": files,
            "files_done": self.files_done,
            "bytes_done": self.bytes_done,
            "files_total": self.files_total,
            "bytes_total": self.bytes_total,
            "fetched": self.uploaded,
        }


@dataclass
class Uploader:
    """Stage-out of one job on this node."""

    agent: Agent
    job: str
    ended_at: float
    trash_prefix: str
    cache_outputs: bool
    progress: ProgressFn

    async def run(self, item: dict[str, Any]) -> dict[str, Any]:
        """Upload one directive's files; raise on a transient failure (the daemon retries)."""
        report = _Report(int(item["request_id"]))
        view = self.agent.cache.jobs / self.job
        try:
            found = await asyncio.to_thread(
                lambda: list(walk(view, PurePosixPath(item["src"]), item["dest_key"]))
            )
        except HpcstageError as exc:
            absent = "does not exist" in str(exc)
            if not absent or not (item.get("optional") or not item.get("job_completed", True)):
                raise
            # Optional, or the job failed before writing it: nothing to keep, nothing lost.
            found = [Skipped(item["src"], f"absent: {exc}")]
        outputs = [o for o in found if isinstance(o, Output)]
        for skip in (s for s in found if isinstance(s, Skipped)):
            report.add(
                {
                    "path": skip.rel,
                    "key": "",
                    "size": 0,
                    "state": "skipped",
                    "error": skip.reason,
                    "trash_key": "",
                }
            )
        report.files_total = len(outputs)
        report.bytes_total = sum(o.size for o in outputs)
        store = self.agent.s3_store(item["dest_bucket"])
        journal = UploadJournal(self.agent.cache.root / "uploads" / self.job, store.bucket)
        # What an earlier attempt of this stage-out left open; another job's uploads to the
        # same keys are not ours to abort.
        await abort_own(store, journal)
        await store.conditional_writes(f"{self.trash_prefix}.probe-{secrets.token_hex(8)}")
        await self._upload_all(store, view, outputs, report, journal)
        journal.tidy()
        self.progress(report.flush())
        failed = report.files_total - report.files_done
        if failed:
            raise HpcstageError(
                f"{failed} of {report.files_total} outputs could not be uploaded"
                " (see the per-file errors)"
            )
        return {
            "request_id": report.request_id,
            "files_done": report.files_done,
            "bytes_done": report.bytes_done,
            "uploaded": report.uploaded,
        }

    async def _upload_all(
        self,
        store: S3Store,
        view: Path,
        outputs: list[Output],
        report: _Report,
        journal: UploadJournal,
    ) -> None:
        sem = asyncio.Semaphore(self.agent.concurrency)
        reporter = asyncio.create_task(self._report_loop(report))

        async def one(output: Output) -> None:
            async with sem:
                report.add(await self._one(store, view, output, journal))

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
        self, store: S3Store, view: Path, output: Output, journal: UploadJournal
    ) -> dict[str, Any]:
        path = view / output.rel
        outcome: dict[str, Any] = {
            "path": output.rel,
            "key": output.key,
            "size": output.size,
            "trash_key": "",
            "error": "",
        }
        try:
            md5, sha = await asyncio.to_thread(file_digests, path)
            existing = await store.describe(output.key)
            if existing is not None and _holds(existing, output, md5, sha):
                outcome["state"] = "present"  # arrived in an earlier run: exactly once
                await self._cache(store, path, existing.ref, sha)
                return outcome
            # Whatever the key holds goes to the bin first, each version under its own name,
            # and is only written over while it is still there (hpcstage.recycle).
            placed = await replace(
                store,
                output.key,
                existing,
                lambda v: trash_key(self.trash_prefix, self.ended_at, self.job, v.key, v.etag),
                lambda only_if: store.upload(
                    path, output.key, only_if=only_if, journal=journal, sha256=sha
                ),
                lambda now: _holds(now, output, md5, sha),
            )
            ref, outcome["trash_key"] = placed.ref, placed.trash_key
            _verify(ref, output)
            outcome["state"] = "uploaded"
            await self._cache(store, path, ref, sha)
        except (TransientStoreError, CredentialError):
            raise  # the whole stage-out is retried later (credentials: reported as failed)
        except (StoreError, HpcstageError, OSError) as exc:
            outcome.update(state="failed", error=str(exc))
        return outcome

    async def _cache(self, store: S3Store, path: Path, ref: ObjectRef, sha: str) -> None:
        """Keep the verified output as an ordinary (unleased) cache entry for later jobs."""
        if not self.cache_outputs:
            return

        async def copy_in(pending: PendingObject) -> str:
            await asyncio.to_thread(_copy_file, path, pending.fd)
            return sha

        try:
            await self.agent.cache.ensure(ref, copy_in)
        except HpcstageError as exc:  # the upload stands; caching is only an optimisation
            log.warning("output %s uploaded but not cached: %s", store.url(ref.key), exc)


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


def _copy_file(path: Path, fd: int) -> None:
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        offset = 0
        while chunk := os.read(src, 1 << 20):
            os.pwrite(fd, chunk, offset)
            offset += len(chunk)
    finally:
        os.close(src)
