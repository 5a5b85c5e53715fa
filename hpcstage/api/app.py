"""The API of one running daemon: the routes of :mod:`hpcstage.api.routes` over a
:class:`~hpcstage.api.service.StagingService`. No staging logic lives in the API."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from hpcstage import __version__
from hpcstage.api import session
from hpcstage.api.deps import ApiState
from hpcstage.api.node_usage import NodeUsage
from hpcstage.api.routes import dashboard, jobs, metrics, nodes, packs, trash, warmups
from hpcstage.api.service import StagingService
from hpcstage.errors import ConfigError

ROUTERS = (
    metrics.router,
    jobs.router,
    warmups.router,
    packs.router,
    nodes.router,
    trash.router,
    dashboard.router,
)


def create_app(service: StagingService) -> FastAPI:
    """The API of ``service``. ConfigError if api.metrics_token_file cannot be used."""
    app = FastAPI(title="hpcstage", version=__version__, docs_url="/api/docs")
    app.state.hpcstage = ApiState(
        service=service,
        metrics_token=_read_token(service.settings.api.metrics_token_file),
        session_key=session.new_key(),
        logins=session.OnceOnly(),
        node_usage=NodeUsage(service.cache_usage),
    )
    for router in ROUTERS:
        app.include_router(router)
    return app


def _read_token(path: Path | None) -> str:
    """The metrics scrape token in ``path`` ("" when unset); ConfigError if unreadable."""
    if path is None:
        return ""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"api.metrics_token_file: cannot read {path}: {exc}") from exc
    if len(token) < 16:
        raise ConfigError(f"api.metrics_token_file: {path} holds fewer than 16 characters")
    return token
