"""How the daemon is doing: /api/v1/health for anyone, Prometheus /metrics for admins and the
site's scraper."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select

from hpcstage import __version__
from hpcstage.api.deps import ApiState, Database, Service, authenticated, state
from hpcstage.db import Job, Staging

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


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(scraper)])
async def metrics(daemon: Service, db: Database) -> str:
    """Prometheus text format (api.metrics_token_file's token as a Bearer, or an admin)."""
    with db.begin() as session:
        rows = session.execute(
            select(
                Staging.state,
                func.count(),
                func.sum(Staging.bytes_done),
                func.sum(Staging.fetched_files),
            ).group_by(Staging.state)
        ).all()
        jobs_by_state = session.execute(
            select(Job.state, func.count()).where(Job.released_at.is_(None)).group_by(Job.state)
        ).all()
    return render_metrics(rows, jobs_by_state, daemon.last_tick)


def render_metrics(rows: Any, jobs_by_state: Any, last_tick: float) -> str:
    """Prometheus exposition text for staging and job counters."""
    out = [
        "# HELP hpcstage_stagings Stagings (one input on one node) by state.",
        "# TYPE hpcstage_stagings gauge",
    ]
    out += [f'hpcstage_stagings{{state="{s}"}} {n}' for s, n, _b, _f in rows]
    out += [
        "# HELP hpcstage_staged_bytes Bytes in job views by staging state.",
        "# TYPE hpcstage_staged_bytes gauge",
    ]
    out += [f'hpcstage_staged_bytes{{state="{s}"}} {b or 0}' for s, _n, b, _f in rows]
    out += [
        "# HELP hpcstage_fetched_files Files fetched from the store (cache misses).",
        "# TYPE hpcstage_fetched_files gauge",
    ]
    out += [f'hpcstage_fetched_files{{state="{s}"}} {f or 0}' for s, _n, _b, f in rows]
    out += [
        "# HELP hpcstage_jobs Jobs with directives not yet released, by Slurm state.",
        "# TYPE hpcstage_jobs gauge",
    ]
    out += [f'hpcstage_jobs{{state="{s}"}} {n}' for s, n in jobs_by_state]
    out += [
        "# HELP hpcstage_last_tick_seconds Unix time of the last queue snapshot.",
        "# TYPE hpcstage_last_tick_seconds gauge",
        f"hpcstage_last_tick_seconds {last_tick}",
    ]
    return "\n".join(out) + "\n"
