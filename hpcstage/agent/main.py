"""``hpcstage agent``: runs on a compute node as the service account and moves bytes.

It reads calls from stdin and writes replies to stdout (JSON lines, see rpc.py). The daemon
decides; the agent lists, fetches into the node cache (verified, crash-safe, shared by
jobs), builds job views with hardlinks, releases them and evicts by policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from hpcstage.agent import peer
from hpcstage.agent.permissions import Person, Reader
from hpcstage.cache import CacheError, NodeCache, PendingObject, key_dest
from hpcstage.cache.layout import lock_cache
from hpcstage.cache.node import GROUP_COMMIT_MAX
from hpcstage.cache.views import hardlinks_protected
from hpcstage.core import limits
from hpcstage.core.directives import quoted
from hpcstage.core.identity import ObjectRef
from hpcstage.core.stageout import shown
from hpcstage.core.units import format_size
from hpcstage.errors import (
    CredentialError,
    HpcstageError,
    ObjectChangedError,
    TransientStoreError,
)
from hpcstage.protocol.framing import MAX_LINE, Handler, ProgressFn, decode, encode
from hpcstage.retry import RetryPolicy
from hpcstage.store.fs import FsStore
from hpcstage.store.protocol import ObjectStore
from hpcstage.store.s3 import S3Store, download_bytes

log = logging.getLogger("hpcstage.agent")

PROGRESS_EVERY = 0.5  # seconds between progress messages per call
LOCK_WAIT = 60.0  # seconds a new agent waits for the previous one of its cache to exit
# Objects in flight per input beyond the `concurrency` downloads: PIPELINE per download slot,
# at most PIPELINE_MAX (each holds its bytes, or an open temp file, until its group commits).
PIPELINE = 3
PIPELINE_MAX = 448
SMALL_OBJECT = GROUP_COMMIT_MAX  # objects up to this size are fetched into memory


@dataclass
class StoreSettings:
    """How to reach the object store; sent by the daemon in ``hello``."""

    endpoint_url: str
    region: str = "us-east-1"
    addressing_style: str = "path"
    verify_tls: bool = True
    ca_bundle: str = ""
    max_connections: int = 128
    connect_timeout: float = 10
    read_timeout: float = 60
    credentials: dict[str, str] | None = None


@dataclass
class Counters:
    """Progress of one request on this node."""

    files_done: int = 0
    bytes_done: int = 0
    files_total: int | None = None
    bytes_total: int | None = None
    fetched: int = 0
    listed_files: int = 0
    listed_bytes: int = 0

    def as_dict(self, request_id: int) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "files_done": self.files_done,
            "bytes_done": self.bytes_done,
            "files_total": self.files_total,
            "bytes_total": self.bytes_total,
            "fetched": self.fetched,
        }


@dataclass
class Agent:
    """The agent's state: one node cache and the stores it fetches from."""

    node: str
    cache: NodeCache
    store: StoreSettings | None = None
    concurrency: int = 64
    part_size: int = 64 * 1024 * 1024
    multipart_threshold: int = 256 * 1024 * 1024
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    lean_get: bool = True
    direct_writes: bool = True
    _stores: dict[str, ObjectStore] = field(default_factory=dict)
    _retired: list[S3Store] = field(default_factory=list)  # clients of superseded credentials

    # ------------------------------------------------------------------ calls

    async def hello(self, params: dict[str, Any], _progress: ProgressFn) -> dict[str, Any]:
        """Receive store settings and limits; report what the cache holds after reconcile."""
        self.store = StoreSettings(**params["store"])
        limits = params.get("transfer", {})
        self.concurrency = int(limits.get("concurrency", self.concurrency))
        self.part_size = int(limits.get("part_size", self.part_size))
        self.multipart_threshold = int(limits.get("multipart_threshold", self.multipart_threshold))
        self.retry = RetryPolicy(
            retries=int(limits.get("retries", 6)),
            base=float(limits.get("backoff_base", 0.5)),
            cap=float(limits.get("backoff_max", 30)),
        )
        self.lean_get = bool(limits.get("lean_get", True))
        self.direct_writes = bool(limits.get("direct_writes", True))
        await self._close_stores()
        report = await asyncio.to_thread(self.cache.reconcile)
        usage = await asyncio.to_thread(self.cache.usage)
        return {
            "node": self.node,
            "pid": os.getpid(),
            "reconcile": _plain(report),
            "usage": _plain(usage),
        }

    async def stage(self, params: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        """Fetch every item into the cache and link it into the job's view.

        With ``"view": false`` (a warmup) the objects are only cached: no view is built, so
        warming 10^8 files costs no 10^8 links to make and then remove.
        """
        job: str | None = None
        view, acl = "", False
        if params.get("view", True):
            job = str(params["job"])
            view = str(self.cache.view_dir(job))
            acl = await asyncio.to_thread(grant_access, Path(view), str(params.get("user", "")))
        user = str(params.get("user", ""))
        results = [await self._stage_item_checked(job, user, i, progress) for i in params["items"]]
        return {"view": view, "acl": acl, "items": results}

    async def stage_out(self, params: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        """Upload a finished job's outputs (see hpcstage.core.stageout); report every file."""
        from hpcstage.agent.uploader import Uploader

        job = str(params["job"])
        # The job is over: its user loses access to the directory before we read it. A process
        # already holding a directory in it as its cwd keeps access there, so the reads do not
        # rely on this: they never follow a symlink and check each file on its fd (jobdir.py).
        await asyncio.to_thread(revoke_access, self.cache.jobs / job, str(params.get("user", "")))
        uploader = Uploader(
            self,
            job,
            str(params.get("user", "")),
            float(params["ended_at"]),
            str(params["trash_prefix"]),
            bool(params.get("cache", True)),
            progress,
        )
        return {"items": [await uploader.run(item) for item in params["items"]]}

    async def release(self, params: dict[str, Any], _progress: ProgressFn) -> dict[str, Any]:
        """Drop a job's view (its lease); the objects stay cached until evicted. ``leftover``
        names what the job made undeletable, set aside under the cache's ``released/``."""
        job = str(params["job"])
        leftover = await asyncio.to_thread(self.cache.release, job)
        return {"released": job, "leftover": leftover}

    async def usage(self, _params: dict[str, Any], _progress: ProgressFn) -> dict[str, Any]:
        """Bytes and objects in the cache, leased and total, and fetch counters."""
        return {
            "usage": _plain(await asyncio.to_thread(self.cache.usage)),
            "stats": _plain(self.cache.stats),
            "views": self.cache.views(),
            "leftovers": self.cache.leftovers(),
        }

    async def evict(self, params: dict[str, Any], _progress: ProgressFn) -> dict[str, Any]:
        """Evict by policy (TTL, then LRU down to the low watermark); leased objects stay."""
        passing = self.cache.evict_iter(
            int(params["max_bytes"]),
            float(params["high"]),
            float(params["low"]),
            float(params["ttl"]),
            time.time(),
            int(params.get("max_objects", 0)),  # absent from an older daemon: bytes only
        )
        # Counted as it goes: a pass over 10^6 expired objects holds no list of their ids.
        evicted = await asyncio.to_thread(lambda: sum(1 for _ in passing))
        return {"evicted": evicted}

    async def ping(self, _params: dict[str, Any], _progress: ProgressFn) -> dict[str, Any]:
        return {"node": self.node, "time": time.time()}

    # ------------------------------------------------------------------ staging

    async def _stage_item_checked(
        self, job: str | None, user: str, item: dict[str, Any], progress: ProgressFn
    ) -> dict[str, Any]:
        result = await self._stage_item(job, user, item, progress)
        if result["files_total"] == 0:
            # A typo in a prefix must not look like an empty, successfully staged input.
            url = item["source"].get("path") or (
                f"s3://{item['source']['bucket']}/{item['source']['key']}"
            )
            raise HpcstageError(f"no objects under {url}")
        return result

    async def _stage_item(
        self, job: str | None, user: str, item: dict[str, Any], progress: ProgressFn
    ) -> dict[str, Any]:
        request_id = int(item["request_id"])
        counters = Counters()
        dest = PurePosixPath(item["dest"])
        store, prefix, is_prefix = self._open_store(item["source"])
        refs = _limited(_refs(store, prefix, is_prefix, counters), item)
        if item["source"]["kind"] == "path" and job is not None:
            # Read as the service account, so checked as the job's user first (docs/security.md).
            # A warmup only fills the cache, which no user reads: a job's staging checks again.
            reader = Reader(await asyncio.to_thread(Person.named, user))
            refs = _readable(refs, reader, prefix if is_prefix else None)
        reporter = asyncio.create_task(_report(progress, counters, request_id))
        try:
            await self._fetch_all(job, refs, prefix if is_prefix else None, dest, store, counters)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        progress(counters.as_dict(request_id))
        return counters.as_dict(request_id)

    async def _fetch_all(
        self,
        job: str | None,
        refs: AsyncIterator[ObjectRef],
        prefix: str | None,
        dest: PurePosixPath,
        store: ObjectStore,
        counters: Counters,
    ) -> None:
        # A bounded queue keeps the listing streamed: 10^6 keys never sit in memory at once.
        queue: asyncio.Queue[ObjectRef | None] = asyncio.Queue(maxsize=self.concurrency * 4)
        # `concurrency` downloads at a time; more objects than that in flight, so that while
        # finished ones wait for their group commit and link the connections stay busy.
        slots = asyncio.Semaphore(self.concurrency)
        workers = [
            asyncio.create_task(self._worker(job, queue, prefix, dest, store, counters, slots))
            for _ in range(self.concurrency + min(self.concurrency * PIPELINE, PIPELINE_MAX))
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
        job: str | None,
        queue: asyncio.Queue[ObjectRef | None],
        prefix: str | None,
        dest: PurePosixPath,
        store: ObjectStore,
        counters: Counters,
        slots: asyncio.Semaphore,
    ) -> None:
        while (ref := await queue.get()) is not None:
            # Checked also without a view: a warmup reports a key no job could use, as the
            # job would.
            target = _view_path(ref, prefix, dest)
            for attempt in range(3):
                fetcher = _Fetcher(store, ref, counters, slots)
                if ref.size <= SMALL_OBJECT:
                    obj = await self.cache.ensure_small(ref, fetcher.read)
                else:
                    obj = await self.cache.ensure(ref, fetcher)
                if job is None:  # cache only (a warmup)
                    break
                try:
                    await self.cache.link_async(job, target, obj)
                    break
                except CacheError:
                    # Evicted between ensure and link (rare): fetch again, then give up.
                    if attempt == 2 or self.cache.lookup(ref) is not None:
                        raise
            counters.files_done += 1
            counters.bytes_done += ref.size

    def _open_store(self, source: dict[str, Any]) -> tuple[ObjectStore, str, bool]:
        """The store holding ``source``, the key or prefix to read, and whether it is a prefix."""
        if source["kind"] == "path":
            path = os.path.normpath(source["path"])
            if os.path.realpath(path) != path:
                # The policy allowed the path as written; a symlink must not lead elsewhere.
                raise HpcstageError(
                    f"{path} leads through a symlink to "
                    f"{os.path.realpath(path)}: name the real path"
                )
            is_dir = os.path.isdir(path)
            root = path if is_dir else os.path.dirname(path)
            store = self._stores.setdefault(f"file:{root}", FsStore(Path(root), retry=self.retry))
            return store, (path.rstrip("/") + "/") if is_dir else path, is_dir
        store = self.s3_store(source["bucket"])
        return store, source["key"], source["kind"] == "s3-prefix"

    def s3_store(self, bucket: str) -> S3Store:
        """The (shared, pooled) client for one bucket of the site's store."""
        if self.store is None:
            raise HpcstageError("agent has no store settings (no hello from the daemon)")
        if bucket not in self._stores:
            s = self.store
            self._stores[bucket] = S3Store(
                s.endpoint_url,
                bucket,
                region=s.region,
                profile=None,
                addressing_style=s.addressing_style,
                verify_tls=s.verify_tls,
                ca_bundle=s.ca_bundle or None,
                max_connections=max(s.max_connections, self.concurrency),
                connect_timeout=s.connect_timeout,
                read_timeout=s.read_timeout,
                part_size=self.part_size,
                multipart_threshold=self.multipart_threshold,
                retry=self.retry,
                credentials=s.credentials,
                lean_get=self.lean_get,
                direct_writes=self.direct_writes,
            )
        found = self._stores[bucket]
        assert isinstance(found, S3Store)
        return found

    async def _close_stores(self) -> None:
        for store in [*self._stores.values(), *self._retired]:
            await store.close()
        self._stores.clear()
        self._retired.clear()

    async def credentials(self, params: dict[str, Any], _progress: ProgressFn) -> dict[str, Any]:
        """New S3 credentials from the daemon, which refreshes temporary ones before they
        expire. New transfers get clients signing with them; transfers under way keep their
        clients (the old keys stay valid a while yet), closed when the next keys arrive."""
        if self.store is None:
            raise HpcstageError("agent has no store settings (no hello from the daemon)")
        self.store.credentials = {k: str(v) for k, v in dict(params["credentials"]).items()}
        for store in self._retired:
            await store.close()
        self._retired = [s for s in self._stores.values() if isinstance(s, S3Store)]
        self._stores = {k: s for k, s in self._stores.items() if not isinstance(s, S3Store)}
        return {"retired": len(self._retired)}

    def handlers(self) -> dict[str, Handler]:
        return {
            "hello": self.hello,
            "credentials": self.credentials,
            "stage": self.stage,
            "release": self.release,
            "stage_out": self.stage_out,
            "usage": self.usage,
            "evict": self.evict,
            "ping": self.ping,
            "peer_list": functools.partial(peer.peer_list, self),
            "peer_want": functools.partial(peer.peer_want, self),
            "peer_read": functools.partial(peer.peer_read, self),
            "peer_put": functools.partial(peer.peer_put, self),
        }


async def _refs(
    store: ObjectStore, key: str, is_prefix: bool, counters: Counters
) -> AsyncIterator[ObjectRef]:
    if not is_prefix:
        ref = await store.head(key)
        counters.files_total, counters.bytes_total = 1, ref.size
        yield ref
        return
    async for ref in store.list(key):
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


class QuotaError(HpcstageError):
    """An input is larger than the job's remaining quota."""


async def _limited(
    refs: AsyncIterator[ObjectRef], item: dict[str, Any]
) -> AsyncIterator[ObjectRef]:
    """Stop the listing as soon as the input outgrows its budget in bytes or objects (before
    fetching that much)."""
    limit = item.get("max_bytes")
    max_objects = item.get("max_objects")
    total = count = 0
    async for ref in refs:
        total, count = total + ref.size, count + 1
        if limit is not None and total > int(limit):
            raise QuotaError(
                f"over quota: this input needs more than {format_size(int(limit))}"
                f" and {item.get('quota_reason', 'a quota applies')}"
            )
        if max_objects is not None and count > int(max_objects):
            reason = str(item.get("objects_reason", "a limit applies"))
            raise limits.too_many_objects(int(max_objects), reason)
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
        return str(result.sha256_hex)

    async def read(self) -> tuple[bytes, str]:
        """The object's bytes in memory (small objects; see NodeCache.ensure_small)."""
        self.counters.fetched += 1
        async with self.slots:
            return await download_bytes(self.store, self.ref)


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


async def _report(progress: ProgressFn, counters: Counters, request_id: int) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY)
        progress(counters.as_dict(request_id))


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


class AccessError(HpcstageError):
    """The job's user cannot be given access to its directory (no ACL support)."""


def grant_access(view: Path, user: str) -> bool:
    """Let the job's user read the view and create outputs in it; keep the agent able to read.

    POSIX ACLs set by the owner (the service account): no root needed. The default entries
    make what the job creates readable to the agent for stage-out. True when an entry was
    added, False when none is needed (the job runs as the service account). AccessError when
    it cannot be done: the view is private to the service account, so a job started anyway
    could not read its inputs.
    """
    if not user or user == _self_user():
        return False
    spec = f"u:{user}:rwx,d:u:{user}:rwx,d:u:{_self_user()}:rwx"
    try:
        done = subprocess.run(
            ["setfacl", "-m", spec, str(view)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        problem = done.stderr.strip() or f"setfacl exited {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        done, problem = None, str(exc)
    if done is None or done.returncode != 0:
        raise AccessError(
            f"cannot give {user} access to the job directory {view}: {problem}; the node"
            " cache needs POSIX ACLs (setfacl, Debian package acl, on a file system with ACL"
            " support)"
        )
    return True


def revoke_access(view: Path, user: str) -> None:
    """Remove the job user's ACL entries from the view (idempotent; best effort)."""
    if not user or user == _self_user() or not view.exists():
        return
    done = subprocess.run(
        ["setfacl", "-x", f"u:{user},d:u:{user}", str(view)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if done.returncode != 0 and "No such" not in done.stderr:
        log.warning("cannot revoke ACLs on %s: %s", view, done.stderr.strip())


def _self_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _plain(obj: Any) -> Any:
    """Dataclass-ish objects to JSON-able dicts."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    if hasattr(obj, "__dict__"):
        return dict(vars(obj))
    return obj


# ---------------------------------------------------------------------- stdio server


async def serve(agent: Agent) -> None:
    """Answer calls from stdin until it closes; each call runs in its own task."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    handlers = agent.handlers()
    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        task = asyncio.create_task(_handle(decode(line), handlers, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await agent._close_stores()


async def _handle(
    message: dict[str, Any], handlers: dict[str, Handler], writer: asyncio.StreamWriter
) -> None:
    call_id = message.get("id", 0)

    def send(reply: dict[str, Any]) -> None:
        writer.write(encode({"id": call_id, **reply}))

    def progress(data: dict[str, Any]) -> None:
        send({"event": "progress", "data": data})

    handler = handlers.get(str(message.get("op")))
    try:
        if handler is None:
            raise HpcstageError(f"unknown op {message.get('op')!r}")
        send({"event": "result", "data": await handler(message.get("params", {}), progress)})
    except (HpcstageError, OSError) as exc:
        transient = isinstance(exc, TransientStoreError | ObjectChangedError)
        send({"event": "error", "message": _user_message(exc), "transient": transient})
    except Exception as exc:  # never let one bad call kill the agent's other work
        log.exception("call %s failed", message.get("op"))
        send({"event": "error", "message": shown(f"internal error: {type(exc).__name__}: {exc}")})
    await writer.drain()


def _user_message(exc: BaseException) -> str:
    """One line for the daemon: printable and storable (a file name that is not UTF-8 in an
    OSError would otherwise fail the daemon's database write, and the staging would never end)."""
    if isinstance(exc, CredentialError):
        return shown(f"store refused the site credentials: {exc}")
    return shown(str(exc) or type(exc).__name__)


def run_agent(node: str, cache_dir: Path) -> None:
    """Entry point of ``hpcstage agent``."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"agent[{node}] %(levelname)s %(message)s"
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock_cache(cache_dir, LOCK_WAIT)  # held until this process exits
    if not hardlinks_protected():
        log.warning(
            "fs.protected_hardlinks is 0: a job can hardlink its inputs outside its directory"
            " and keep them from eviction; set it to 1 (sysctl, the usual default)"
        )
    agent = Agent(node=node, cache=NodeCache(cache_dir))
    asyncio.run(serve(agent))
