"""How the daemon is doing: /api/v1/health for anyone, Prometheus /metrics for admins and the
site's scraper."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hpcstage import __version__
from hpcstage.api.deps import ApiState, Service, authenticated, state

router = APIRouter()


@router.get("/api/v1/health")
async def health(daemon: Service) -> dict[str, Any]:
    """Liveness: version and when the last queue snapshot was taken."""
    return {
        "version": __version__,
        "last_tick": daemon.last_tick,
        "last_error": daemon.last_error,
    }


async def scraper(
    shared: ApiState = Depends(state), authorization: str = Header(default="")
) -> None:
    """/metrics' reader: the site's scrape token, or an admin's MUNGE credential."""
    scheme, _, given = authorization.partition(" ")
    token = shared.metrics_token
    if scheme == "Bearer" and token:
        if hmac.compare_digest(given.strip().encode(), token.encode()):
            return
        shared.service.audit.record("auth-refused", reason="wrong metrics token")
        raise HTTPException(401, "wrong metrics token")
    me = await authenticated(shared.service, authorization)
    if not me.admin:
        raise HTTPException(403, "metrics are for admins and the site's scraper")


@router.get("/metrics", dependencies=[Depends(scraper)])
async def metrics(shared: ApiState = Depends(state)) -> Response:
    """Prometheus text format (api.metrics_token_file's token as a Bearer, or an admin);
    docs/metrics.md lists the metrics."""
    return Response(generate_latest(shared.registry), media_type=CONTENT_TYPE_LATEST)
