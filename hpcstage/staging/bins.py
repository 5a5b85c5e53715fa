"""The recycle bins of the buckets stage-out writes to, through the daemon's own S3 clients.

The daemon only copies and deletes in recycle bins (restores, expiry), and lists the sources
``hpcstage warmup --check`` asks about (``staging/holdings.py``) with the same clients; users
name buckets in requests, so at most ``STORE_CLIENTS`` idle clients (each a connection pool)
stay open.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.config.schema import Settings
from hpcstage.db import Request
from hpcstage.staging import trash
from hpcstage.staging.access import StoreAccess
from hpcstage.store.clients import ClientCache
from hpcstage.store.protocol import parse_s3_url
from hpcstage.store.s3 import S3Store

STORE_CLIENTS = 8


@dataclass
class RecycleBins:
    """The daemon's S3 clients for the stage-out buckets, and the expiry of their bins."""

    settings: Settings
    access: StoreAccess
    stores: ClientCache[S3Store] = field(init=False)

    def __post_init__(self) -> None:
        self.stores = ClientCache(STORE_CLIENTS, self._new_store)

    def store(self, bucket: str) -> contextlib.AbstractAsyncContextManager[S3Store]:
        """The daemon's own client for ``bucket``, for an ``async with`` block."""
        return self.stores.lease(bucket)

    def _new_store(self, bucket: str) -> S3Store:
        s = self.settings.store
        return S3Store(
            s.endpoint_url,
            bucket,
            region=self.access.region,
            profile=s.profile,
            addressing_style=s.addressing_style,
            verify_tls=s.verify_tls,
            ca_bundle=str(s.ca_bundle) if s.ca_bundle else None,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            credentials=self.access.credentials,
        )

    async def expire(self, db: sessionmaker[Session]) -> int:
        """Delete recycle-bin entries older than stage_out.trash_retention, in every bucket."""
        conf, deleted = self.settings.stage_out, 0
        for bucket in stage_out_buckets(db):
            async with self.store(bucket) as store:
                deleted += await trash.expire(
                    store, conf.trash_prefix, conf.trash_retention, time.time()
                )
        return deleted

    async def close(self) -> None:
        """Close every client."""
        await self.stores.close()


def stage_out_buckets(db: sessionmaker[Session]) -> list[str]:
    """Buckets that stage-out has written to (where recycle bins may exist)."""
    with db.begin() as session:
        dests = session.scalars(select(Request.dest).where(Request.direction == "out"))
        return sorted({parse_s3_url(d)[0] for d in dests})
