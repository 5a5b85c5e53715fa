"""/api/v1/trash: the recycle bin of stage-out (objects it replaced), and restoring them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from hpcstage.api.bin_access import may_not_restore, visible
from hpcstage.api.deps import Caller, Database, Service, Text
from hpcstage.core.directives import check_bucket
from hpcstage.errors import DirectiveError, HpcstageError
from hpcstage.staging import trash
from hpcstage.store.protocol import parse_s3_url

router = APIRouter(prefix="/api/v1/trash")


class RestoreIn(BaseModel):
    """Body of POST /api/v1/trash/restore."""

    url: Text = Field(description="s3://bucket/<trash_prefix><day>/<job>~<version>/<key>")


@router.get("")
async def trash_list(
    daemon: Service,
    db: Database,
    me: Caller,
    bucket: str | None = Query(None, description="a bucket name (default: every bucket)"),
    prefix: str = Query("", description="only entries whose original key starts with it"),
    limit: int = Query(trash.PAGE, ge=1, le=trash.PAGE, description="keys to examine"),
    after: str = Query("", description="`next` of the previous page"),
) -> dict[str, Any]:
    """Objects that your jobs' stage-outs replaced (admins: all), kept for the retention,
    one page at a time: ``next`` is '' after the last page. A page examines at most
    ``limit`` recycle-bin keys, so it may hold fewer entries (even none) before the end.
    ``bucket`` and ``prefix`` are the two halves of the CLI's s3://BUCKET/PREFIX."""
    buckets = [_bucket_name(bucket)] if bucket else daemon.stage_out_buckets()
    _check_token(after, buckets)
    try:
        page = await trash.list_page(
            buckets, daemon.store, daemon.settings.stage_out.trash_prefix, after, limit, prefix
        )
    except (ValueError, HpcstageError) as exc:
        raise HTTPException(400, str(exc)) from exc
    return {"entries": [e.as_dict() for e in visible(db, me, page.entries)], "next": page.next}


def _bucket_name(bucket: str) -> str:
    """``bucket`` if it is a bucket name, else 400 naming the parameter (an s3:// URL here
    reached botocore as a bucket name: a 500)."""
    try:
        check_bucket(bucket)
    except DirectiveError as exc:
        raise HTTPException(
            400, f"bucket: {exc} (the bucket alone; a key prefix goes in prefix)"
        ) from exc
    return bucket


def _check_token(after: str, buckets: list[str]) -> None:
    """400 naming ``after`` unless it is '' or a token of this listing."""
    if not after:
        return
    try:
        start, _key = trash.decode_token(after)
    except HpcstageError as exc:
        raise HTTPException(400, f"after: {exc}") from exc
    if start not in buckets:
        raise HTTPException(400, "after: the continuation token is for another bucket")


@router.post("/restore")
async def trash_restore(
    body: RestoreIn, daemon: Service, db: Database, me: Caller
) -> dict[str, str]:
    """Put a recycle-bin entry back at its key (what is there now goes to the bin)."""
    prefix = daemon.settings.stage_out.trash_prefix
    try:
        bucket, key = parse_s3_url(body.url)
        day, job_key, original = trash.parse_trash_key(prefix, key)
        url = f"s3://{bucket}/{original}"
        refused = may_not_restore(db, daemon.settings.policy, me, (job_key, day), url)
        if refused:
            raise HTTPException(403, refused)
        async with daemon.store(bucket) as store:
            done = await trash.restore(store, prefix, key)
    except (ValueError, HpcstageError) as exc:
        raise HTTPException(400, f"url: {exc}") from exc
    daemon.audit.record("trash-restore", user=me.user, bucket=bucket, **done)
    return done
