"""/api/v1/pins: datasets admins keep warm on chosen nodes (``hpcstage pin``), with a schedule.

Admins only, reading included: what is kept warm, and where, is the site's business. Not a
packed dataset's pinned version (that is ``@N`` in a source).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import select

from hpcstage.api.deps import Caller, Database, RowId, Service, Text
from hpcstage.api.routes.warmups import known_nodes_only
from hpcstage.api.service import StagingService
from hpcstage.auth import Identity
from hpcstage.db import KeptWarm
from hpcstage.errors import DirectiveError
from hpcstage.staging.keepwarm import PinRequest, document

router = APIRouter(prefix="/api/v1/pins")
UNIX_TIME_MAX = 2**33  # the year 2242: a later "until" is a mistake, not a plan


class PinIn(BaseModel):
    """Body of POST /api/v1/pins."""

    src: Text = Field(
        max_length=2048,
        description="what to keep warm, as a --stage-in value",
        examples=["s3://datasets/genomes/hg38/"],
    )
    nodes: list[Text] = Field(
        min_length=1, max_length=65536, description="node names, expanded", examples=[["n1"]]
    )
    schedule: Text = Field(
        "",
        max_length=128,
        description="refresh times: 'every N{s,m,h,d}' or five cron fields; '' = never",
        examples=["0 6 * * 1-5", "every 6h"],
    )
    until: float | None = Field(
        None,
        ge=0,
        le=UNIX_TIME_MAX,
        allow_inf_nan=False,
        description="Unix time after which the dataset is no longer kept warm",
        examples=[None, 1893456000],
    )


def _admin(daemon: StagingService, me: Identity, route: str) -> None:
    """403, audited, for anyone who is not an admin."""
    if not me.admin:
        daemon.audit.record("refused", user=me.user, route=route, reason="pins are for admins")
        raise HTTPException(
            403, f"only admins may keep datasets warm (hpcstage pin): {me.user} is not one"
        )


@router.post("", status_code=201)
async def add(body: PinIn, daemon: Service, me: Caller) -> dict[str, Any]:
    """Keep SRC staged and leased on NODES (refreshed on SCHEDULE) until removed or UNTIL."""
    _admin(daemon, me, "POST /api/v1/pins")
    nodes = list(dict.fromkeys(body.nodes))  # each node once
    await known_nodes_only(daemon, f"pin of {body.src}", nodes)
    pin = PinRequest(body.src, nodes, body.schedule, body.until)
    try:
        pin_id = daemon.create_pin(pin, me.user, me.admin)
    except DirectiveError as exc:
        raise HTTPException(400, str(exc)) from exc
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from exc
    return {"id": pin_id}


@router.get("")
async def listing(
    daemon: Service, db: Database, me: Caller, removed: bool = False
) -> list[dict[str, Any]]:
    """Every dataset kept warm (``removed``: also those no longer kept), oldest first."""
    _admin(daemon, me, "GET /api/v1/pins")
    query = select(KeptWarm).order_by(KeptWarm.id)
    if not removed:
        query = query.where(KeptWarm.removed_at.is_(None))
    with db.begin() as session:
        return [document(session, pin) for pin in session.scalars(query)]


@router.get("/{pin_id}")
async def show(pin_id: RowId, daemon: Service, db: Database, me: Caller) -> dict[str, Any]:
    """One kept-warm dataset: its settings, each node's staging, the last refresh's result."""
    _admin(daemon, me, f"GET /api/v1/pins/{pin_id}")
    with db.begin() as session:
        pin = session.get(KeptWarm, pin_id)
        if pin is None:
            raise HTTPException(404, f"pin {pin_id} is not known to hpcstage")
        return document(session, pin)


@router.delete("/{pin_id}")
async def remove(pin_id: RowId, daemon: Service, me: Caller) -> dict[str, Any]:
    """Stop keeping the dataset warm: its leases end at the next tick, the data then ages
    out of the caches like any other."""
    _admin(daemon, me, f"DELETE /api/v1/pins/{pin_id}")
    try:
        removed = daemon.remove_pin(pin_id, me.user, me.admin)
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from exc
    if not removed:
        raise HTTPException(404, f"pin {pin_id} is not kept warm (unknown or removed already)")
    return {"id": pin_id, "removed": True}
