"""The API of one running daemon: the routes of :mod:`hpcstage.api.routes` over a
:class:`~hpcstage.api.service.StagingService`. No staging logic lives in the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from hpcstage import __version__
from hpcstage.api import session
from hpcstage.api.collector import registry_for
from hpcstage.api.deps import ApiState
from hpcstage.api.node_usage import NodeUsage
from hpcstage.api.routes import (
    cache,
    dashboard,
    jobs,
    metrics,
    nodes,
    packs,
    pins,
    trash,
    warmups,
)
from hpcstage.api.service import StagingService
from hpcstage.errors import ConfigError

ROUTERS = (
    metrics.router,
    jobs.router,
    warmups.router,
    packs.router,
    pins.router,
    nodes.router,
    cache.router,
    trash.router,
    dashboard.router,
)


def create_app(service: StagingService) -> FastAPI:
    """The API of ``service``. ConfigError if api.metrics_token_file cannot be used."""
    app = FastAPI(
        title="hpcstage",
        version=__version__,
        docs_url="/api/docs",
        default_response_class=AsciiJSON,
    )
    app.add_exception_handler(HTTPException, _refused)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.state.hpcstage = ApiState(
        service=service,
        metrics_token=_read_token(service.settings.api.metrics_token_file),
        session_key=session.new_key(),
        logins=session.OnceOnly(),
        registry=registry_for(service),
        node_usage=NodeUsage(service.cache_usage),
    )
    for router in ROUTERS:
        app.include_router(router)
    return app


class AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: a refusal quotes what it refuses, and a
    JSON body may carry a lone surrogate (\\ud800), which UTF-8 cannot encode (a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


async def _refused(request: Request, exc: Exception) -> AsciiJSON:
    assert isinstance(exc, HTTPException)
    return AsciiJSON({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def _invalid(request: Request, exc: Exception) -> AsciiJSON:
    """422 with FastAPI's own body: each problem's ``loc`` names the parameter."""
    assert isinstance(exc, RequestValidationError)
    return AsciiJSON({"detail": jsonable_encoder(exc.errors())}, 422)


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
