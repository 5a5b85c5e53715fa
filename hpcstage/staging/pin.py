"""Pinning a packed dataset's version once per request (docs/packed-datasets.md).

A stage-in of ``.../NAME.hpack/...`` without ``@N`` means "the newest version when the job is
staged". The daemon settles that once, before the first node stages the request, and stores
the pinned source (``...hpack@N/...``) as the request's ``src``: every node of a multi-node
job, and a requeued job, then stages the same version, even if a new one is packed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from hpcstage.core.directives import Source, SourceKind, parse_source
from hpcstage.core.packed import DatasetRef
from hpcstage.db import Request
from hpcstage.errors import HpcstageError
from hpcstage.packed.dataset import PackedDataset
from hpcstage.store.protocol import ObjectStore
from hpcstage.watch.fold import log_event

log = logging.getLogger("hpcstage.daemon")

OpenStore = Callable[[str], contextlib.AbstractAsyncContextManager[ObjectStore]]


def needs_pin(src: str) -> bool:
    """True for a packed dataset source that names no version."""
    if not src:
        return False
    source = parse_source(src)
    return source.kind is SourceKind.S3_PACKED and DatasetRef.parse(source.key).version is None


class Pinner:
    """Pins the version of packed sources, one request at a time."""

    def __init__(self, db: sessionmaker[Session], stores: OpenStore | None) -> None:
        self.db = db
        self.stores = stores
        self._lock = asyncio.Lock()  # the nodes of one job must not pin twice

    async def pinned(self, request_id: int, src: str) -> str:
        """``src`` with its version pinned (written to the request), or ``src`` unchanged
        when it needs none. Without a store the agent takes the newest version itself; a
        store that cannot be read now is logged and leaves the choice to the agent too."""
        if not needs_pin(src) or self.stores is None:
            return src
        async with self._lock:
            with self.db.begin() as session:
                src = session.get_one(Request, request_id).src  # another node may have pinned
            if not needs_pin(src):
                return src
            source = parse_source(src)
            ref = DatasetRef.parse(source.key)
            try:
                async with self.stores(source.bucket) as store:
                    versions = await PackedDataset(store, ref.prefix).versions()
            except HpcstageError as exc:
                log.warning("cannot read the versions of %s: %s", src, exc)
                return src
            if not versions:
                return src  # the agent's stage fails, saying the dataset has no version
            pinned = Source(SourceKind.S3_PACKED, source.bucket, ref.pinned(max(versions)).key())
            with self.db.begin() as session:
                request = session.get_one(Request, request_id)
                request.src = pinned.url
                log_event(session, request.job_id, "", f"pinned {src} to {pinned.url}")
            return pinned.url
