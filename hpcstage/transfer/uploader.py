"""The agent's side of stage-out: walk, compare, recycle, upload, verify, cache. See stageout.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from hpcstage import limits
from hpcstage.cache import PendingObject
from hpcstage.errors import CredentialError, HpcstageError, StoreError, TransientStoreError
from hpcstage.identity import ObjectRef
from hpcstage.stageout import Output, Skipped, file_digests, same_object, trash_key, walk
from hpcstage.store import S3Store
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
        # The job's limits on files and bytes, checked as the walk goes (before any upload).
        bound = limits.OutputLimit(
            item.get("max_files"), item.get("max_bytes"), str(item.get("limit_reason", ""))
        )

        def walked() -> Iterator[Output | Skipped]:
            return walk(view, PurePosixPath(item["src"]), item["dest_key"])

        try:
            found = await asyncio.to_thread(lambda: list(bound.bounded(walked(), _entry_size)))
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
        await store.abort_uploads(item["dest_key"], {o.key for o in outputs})
        await self._upload_all(store, view, outputs, report)
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
        self, store: S3Store, view: Path, outputs: list[Output], report: _Report
    ) -> None:
        sem = asyncio.Semaphore(self.agent.concurrency)
        reporter = asyncio.create_task(self._report_loop(report))

        async def one(output: Output) -> None:
            async with sem:
                report.add(await self._one(store, view, output))

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

    async def _one(self, store: S3Store, view: Path, output: Output) -> dict[str, Any]:
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
            existing = await store.head_or_none(output.key)
            if existing is not None and same_object(existing.etag, existing.size, md5, output.size):
                outcome["state"] = "present"  # arrived in an earlier run: exactly once
                await self._cache(store, path, existing, sha)
                return outcome
            if existing is not None:
                outcome["trash_key"] = trash_key(
                    self.trash_prefix, self.ended_at, self.job, output.key
                )
                # A retried stage-out finds the recycle-bin copy of the original from the first
                # run already there: keep it, never overwrite it with this job's own output.
                if await store.head_or_none(outcome["trash_key"]) is None:
                    await store.copy(output.key, outcome["trash_key"])
            ref = await store.upload(path, output.key)
            _verify(ref, output, md5)
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


def _entry_size(entry: Output | Skipped) -> int:
    return entry.size if isinstance(entry, Output) else 0


def _verify(ref: ObjectRef, output: Output, md5: str) -> None:
    if ref.size != output.size:
        raise TransientStoreError(
            f"{output.key}: store holds {ref.size} bytes after upload, expected {output.size}"
        )
    if "-" not in ref.etag and ref.etag.lower() != md5:
        raise TransientStoreError(f"{output.key}: checksum mismatch after upload")


def _copy_file(path: Path, fd: int) -> None:
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        offset = 0
        while chunk := os.read(src, 1 << 20):
            os.pwrite(fd, chunk, offset)
            offset += len(chunk)
    finally:
        os.close(src)
