"""The agent's small calls: hello, credentials, release, usage, evict, drop_source, ping.

The transfers are elsewhere: ``stagein.py`` (stage), ``uploader.py`` (stage_out),
``peer.py`` (peer_*).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from hpcstage.agent import packed
from hpcstage.agent.context import NodeContext
from hpcstage.core.directives import SourceKind
from hpcstage.core.fencing import Epoch, describe
from hpcstage.errors import FencedError, HpcstageError
from hpcstage.protocol.messages import (
    PEER_KINDS,
    CredentialsReply,
    CredentialsRequest,
    DropSourceReply,
    DropSourceRequest,
    Empty,
    EvictReply,
    EvictRequest,
    HelloReply,
    HelloRequest,
    PingReply,
    RateLimits,
    ReleaseReply,
    ReleaseRequest,
    UsageReply,
)


async def hello(ctx: NodeContext, request: HelloRequest) -> HelloReply:
    """Take store settings and limits; report what the cache holds after reconcile."""
    mine = ctx.fence.mine if ctx.fence is not None else None
    if mine is not None and request.fence != mine:  # the server checked the record already
        raise FencedError(
            f"fenced: hello from the daemon of leader {_epoch(request.fence)}, but this agent"
            f" was started for {describe(mine)}"
        )
    transfer = request.transfer
    ctx.cache.durable_before_read = request.cache.durable_before_read
    if not request.cache.durable_before_read:
        # O_DIRECT would make the job wait for the disk, the wait that objects readable from
        # the page cache before they are durable take off its path.
        transfer = dataclasses.replace(transfer, direct_writes=False)
    # Nor are writeback hints worth it then: on this week's kernel they made a 1 GiB object
    # readable in 1.5-2.0 s instead of 0.9 s (docs/benchmarks.md).
    ctx.stores.writeback_hints = request.cache.durable_before_read
    await ctx.stores.configure(request.store, transfer)
    report = await asyncio.to_thread(ctx.cache.reconcile)
    usage = await asyncio.to_thread(ctx.cache.usage)
    return HelloReply(ctx.node, ctx.pid, plain(report), plain(usage))


def _epoch(epoch: Epoch | None) -> str:
    return describe(epoch) if epoch is not None else "no epoch"


async def credentials(ctx: NodeContext, request: CredentialsRequest) -> CredentialsReply:
    """New S3 credentials from the daemon, which refreshes temporary ones before they expire."""
    return CredentialsReply(retired=await ctx.stores.renew_credentials(request.credentials))


async def release(ctx: NodeContext, request: ReleaseRequest) -> ReleaseReply:
    """Drop a job's view (its lease); the objects stay cached until evicted. ``leftover``
    names what the job made undeletable, set aside under the cache's ``released/``."""
    leftover = await asyncio.to_thread(ctx.cache.release, request.job)
    await packed.release(ctx, request.job)  # its packed trees' leases and ACL entries
    return ReleaseReply(released=request.job, leftover=leftover)


async def usage(ctx: NodeContext, _request: Empty) -> UsageReply:
    """Bytes and objects in the cache, leased and total, and fetch counters."""
    return UsageReply(
        usage=plain(await asyncio.to_thread(ctx.cache.usage)),
        stats=plain(ctx.cache.stats),
        views=ctx.cache.views(),
        leftovers=ctx.cache.leftovers(),
    )


async def evict(ctx: NodeContext, request: EvictRequest) -> EvictReply:
    """Evict by policy (TTL, then LRU down to the low watermark); leased objects stay."""
    passing = ctx.cache.evict_iter(
        request.max_bytes, request.high, request.low, request.ttl, time.time(), request.max_objects
    )
    # Counted as it goes: a pass over 10^6 expired objects holds no list of their ids.
    evicted = await asyncio.to_thread(lambda: sum(1 for _ in passing))
    size, objects = await asyncio.to_thread(ctx.cache.totals)
    stores = ctx.stores
    tally = stores.tally
    return EvictReply(evicted, size, objects, tally.retries, stores.fallbacks(), tally.since)


async def drop_source(ctx: NodeContext, request: DropSourceRequest) -> DropSourceReply:
    """Evict every cached version of an S3 source's objects; those a job links stay."""
    source = request.source
    if source.kind not in PEER_KINDS:  # the daemon sends S3 sources only
        raise HpcstageError(f"cannot evict {source.url()}: S3 sources only")
    if ctx.evicting_source:
        # One at a time: the daemon gives up on a slow one after a while, and its user may
        # then ask again while this node's thread still walks the index.
        raise HpcstageError(f"an eviction of a source is still running on {ctx.node}: try later")
    store_id = ctx.stores.s3(source.bucket).store_id
    exact = source.kind is SourceKind.S3_OBJECT
    ctx.evicting_source = True
    try:
        done = await asyncio.to_thread(
            ctx.cache.evict_source, store_id, source.bucket, source.key, exact
        )
    finally:
        ctx.evicting_source = False
    return DropSourceReply(done.evicted, done.evicted_bytes, done.in_use, done.in_use_bytes)


async def rates(ctx: NodeContext, request: RateLimits) -> Empty:
    """New store rate limits for every transfer of the agent, those under way included."""
    ctx.stores.set_rates(request)
    return Empty()


async def ping(ctx: NodeContext, _request: Empty) -> PingReply:
    """Who answers, and when (a liveness check)."""
    return PingReply(node=ctx.node, time=time.time())


def plain(obj: Any) -> dict[str, Any]:
    """A cache report (a dataclass or a plain object) as a JSON-able dict."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    return dict(vars(obj))
