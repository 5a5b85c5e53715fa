"""/api/v1/packs: packing an S3 prefix into a packed dataset on the daemon, and following it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from hpcstage.api.deps import Caller, Database, RowId, Service, Text
from hpcstage.api.follow import MAX_WAIT, SINCE, WAIT
from hpcstage.core.packing import PackRequest
from hpcstage.db import Pack
from hpcstage.db.changes import pack_key
from hpcstage.errors import DirectiveError, LimitError

router = APIRouter(prefix="/api/v1/packs")


class PackIn(BaseModel):
    """Body of POST /api/v1/packs."""

    src: Text = Field(
        max_length=2048,
        description="s3://bucket/prefix/ to pack",
        examples=["s3://datasets/chem/ligands/"],
    )
    dest: Text = Field(
        max_length=2048,
        description="s3://bucket/.../NAME.hpack/ to write",
        examples=["s3://results/chem/ligands.hpack/"],
    )
    update: bool = Field(False, description="pack only what changed since the newest version")
    segment_size: Text = Field(
        "256M", max_length=16, description="segment size (K/M/G)", examples=["64M"]
    )
    verify: bool = Field(False, description="read the new segments back and check them")


@router.post("", status_code=201)
async def create(body: PackIn, daemon: Service, me: Caller) -> dict[str, Any]:
    """Pack SRC into a new version of DEST with the site's credentials, on the daemon's host,
    if the policy lets the caller read SRC and write DEST; poll GET /api/v1/packs/{id}."""
    request = PackRequest(body.src, body.dest, body.update, body.segment_size, body.verify)
    try:
        pack_id = daemon.create_pack(request, me.user, me.admin)
    except DirectiveError as exc:
        raise HTTPException(400, str(exc)) from exc
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from exc
    except LimitError as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": "60"}) from exc
    return {"id": pack_id}


@router.get("/{pack_id}")
async def status(
    pack_id: RowId,
    daemon: Service,
    db: Database,
    me: Caller,
    since: int | None = SINCE,
    wait: float = WAIT,
) -> dict[str, Any]:
    """A pack's state and progress (``since``/``wait``: as for a job: answer once it changed
    after the ``changes`` count ``since``, or after ``wait`` seconds)."""
    with db.begin() as session:
        _owned(session.get(Pack, pack_id), me.user, me.admin, pack_id)
    await daemon.changes.wait(pack_key(pack_id), since, min(wait, MAX_WAIT))
    with db.begin() as session:
        return daemon.pack_document(session, session.get_one(Pack, pack_id))


def _owned(row: Pack | None, user: str, admin: bool, pack_id: int) -> Pack:
    if row is None:
        raise HTTPException(404, f"pack {pack_id} is not known to hpcstage")
    if not admin and row.user != user:
        raise HTTPException(403, f"pack {pack_id} belongs to another user")
    return row
