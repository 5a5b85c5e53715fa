"""/api/v1/cache: how much of one source the nodes' caches hold, and evicting it from them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from hpcstage.api.deps import Caller, Service, Text
from hpcstage.api.routes.warmups import known_nodes_only
from hpcstage.errors import DirectiveError, HpcstageError, LimitError, ObjectMissingError

router = APIRouter(prefix="/api/v1/cache")

SRC_HELP = "s3://bucket/key or s3://bucket/prefix/"


class CheckIn(BaseModel):
    """Body of POST /api/v1/cache/check."""

    src: Text = Field(max_length=2048, description=SRC_HELP, examples=["s3://datasets/chem/"])
    nodes: list[Text] = Field(
        min_length=1, description="node names, expanded", examples=[["n1", "n2"]]
    )


class EvictIn(BaseModel):
    """Body of POST /api/v1/cache/evict."""

    src: Text = Field(max_length=2048, description=SRC_HELP, examples=["s3://datasets/chem/"])
    nodes: list[Text] | None = Field(
        None,
        min_length=1,
        description="node names, expanded (default: every node Slurm knows)",
        examples=[["n1", "n2"]],
    )


@router.post("/check")
async def check(body: CheckIn, daemon: Service, me: Caller) -> dict[str, Any]:
    """How many of SRC's objects (as the store holds them now) and bytes each node's cache
    holds, and the total; for whoever may read SRC. A node whose agent cannot be reached has
    an ``error`` and counts as holding nothing in the total."""
    await known_nodes_only(daemon, f"cache check of {body.src}", body.nodes)
    try:
        return await daemon.check_source(body.src, body.nodes, me.user, me.admin)
    except ObjectMissingError as exc:
        raise HTTPException(404, f"src: {exc}") from exc
    except LimitError as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": "60"}) from exc
    except HpcstageError as exc:  # a malformed SRC, a store that cannot be listed
        raise HTTPException(_status(exc), f"src: {exc}") from exc
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from exc


@router.post("/evict")
async def evict(body: EvictIn, daemon: Service, me: Caller) -> dict[str, Any]:
    """Evict SRC's cached objects (every cached version) on NODES; objects a job's directory
    links stay and are counted as in use. For admins and whoever may read SRC."""
    nodes = body.nodes if body.nodes is not None else daemon.known_nodes()
    await known_nodes_only(daemon, f"cache evict of {body.src}", nodes)
    try:
        return await daemon.evict_source(body.src, nodes, me.user, me.admin)
    except LimitError as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": "60"}) from exc
    except HpcstageError as exc:
        raise HTTPException(_status(exc), f"src: {exc}") from exc
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from exc


def _status(exc: HpcstageError) -> int:
    """400 for a SRC the request got wrong, 502 for a store the daemon could not read."""
    return 400 if isinstance(exc, DirectiveError) else 502
