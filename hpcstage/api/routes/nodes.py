"""/api/v1/nodes: Slurm's nodes and what each one's cache holds; eviction on demand."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from hpcstage.api.deps import Caller, Service
from hpcstage.errors import HpcstageError

router = APIRouter(prefix="/api/v1/nodes")


@router.get("")
async def nodes(daemon: Service, me: Caller) -> list[str]:
    """Node names as Slurm reports them."""
    return daemon.known_nodes()


@router.get("/{node}/cache")
async def node_cache(node: str, daemon: Service, me: Caller) -> dict[str, Any]:
    """One node's cache: bytes and objects (leased and total), job directories, counters."""
    if node not in daemon.known_nodes():
        raise HTTPException(404, f"no node {node} in Slurm")
    try:
        return await daemon.cache_usage(node)
    except (HpcstageError, TimeoutError) as exc:
        raise HTTPException(502, f"cannot reach the agent on {node}: {exc}") from exc


@router.post("/{node}/evict")
async def evict_node(node: str, daemon: Service, me: Caller) -> dict[str, int]:
    """Admins: apply the eviction policy on NODE now (leased data is never evicted)."""
    if not me.admin:
        raise HTTPException(403, "only admins may trigger eviction")
    # Slurm's nodes only: the daemon logs in to NODE, and a name from the URL could be any
    # host (or address: "1.5" resolves) the service account can reach.
    if node not in daemon.known_nodes():
        raise HTTPException(404, f"no node {node} in Slurm")
    try:
        # This node only: an admin's request does not wait for every other node's pass.
        return {"evicted": await daemon.evict_node(node)}
    except (HpcstageError, TimeoutError) as exc:
        raise HTTPException(502, f"cannot reach the agent on {node}: {exc}") from exc
