"""/api/v1/warmups: staging a source onto nodes ahead of any job, and following it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from hpcstage.api.deps import Caller, Database, RowId, Service, Text, owned
from hpcstage.api.follow import SINCE, WAIT, followed
from hpcstage.api.service import StagingService
from hpcstage.db import Job
from hpcstage.errors import DirectiveError, LimitError

NODES_SHOWN = 20  # of Slurm's nodes, in the message about an unknown one

router = APIRouter(prefix="/api/v1/warmups")


class WarmupIn(BaseModel):
    """Body of POST /api/v1/warmups."""

    src: Text = Field(
        description=(
            "as a --stage-in value: s3://bucket/key (?versionId=V pins a version),"
            " s3://bucket/prefix/ (::include=GLOB,exclude=GLOB filters it) or /shared/path"
        ),
        examples=["s3://datasets/climate/::include=**/*.nc,exclude=tmp/**"],
    )
    nodes: list[Text] = Field(
        min_length=1, description="node names, expanded", examples=[["n1", "n2"]]
    )


@router.post("", status_code=201)
async def warmup(body: WarmupIn, daemon: Service, me: Caller) -> dict[str, Any]:
    """Stage SRC onto NODES ahead of any job; poll GET /api/v1/warmups/{id}."""
    await known_nodes_only(daemon, f"warmup of {body.src}", body.nodes)
    try:
        warm_id = daemon.create_warmup(body.src, body.nodes, me.user, me.admin)
    except DirectiveError as exc:
        raise HTTPException(400, f"src: {exc}") from exc
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from exc
    except LimitError as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": "60"}) from exc
    return {"id": warm_id}


async def known_nodes_only(daemon: StagingService, what: str, nodes: list[str]) -> None:
    """400 naming those of ``nodes`` Slurm does not know, and some it does (``what``: the
    request, for the message). Slurm's nodes only: the daemon logs in to a node by its name,
    which could be any host it can reach."""
    unknown = await daemon.unknown_nodes(nodes)
    if not unknown:
        return
    known = daemon.known_nodes()
    more = f" and {len(known) - NODES_SHOWN} more" if len(known) > NODES_SHOWN else ""
    shown = ", ".join(known[:NODES_SHOWN]) + more
    raise HTTPException(
        400,
        f"{what}: Slurm has no node {', '.join(unknown[:NODES_SHOWN])} (its nodes: {shown})",
    )


@router.get("/{warm_id}")
async def warmup_status(
    warm_id: RowId,
    daemon: Service,
    db: Database,
    me: Caller,
    since: int | None = SINCE,
    wait: float = WAIT,
) -> dict[str, Any]:
    """Progress of one warmup per node (``since``/``wait``: as for a job)."""
    with db.begin() as session:
        found = session.get(Job, warm_id)
        if found is not None and found.kind != "warmup":
            found = None
        owned(found, me, f"warmup {warm_id}")
    return await followed(daemon, db, warm_id, since, wait)
