"""What the routes share, as FastAPI dependencies: the service, its database, the caller.

One :class:`ApiState` is made per app (:func:`hpcstage.api.app.create_app`) and kept on
``app.state``; routes reach it through :func:`state` and the aliases below, never through a
global, so two apps (tests) never share anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Path, Request
from prometheus_client import CollectorRegistry
from pydantic import AfterValidator
from sqlalchemy.orm import Session, sessionmaker

from hpcstage import auth
from hpcstage.api import session
from hpcstage.api.node_usage import NodeUsage
from hpcstage.api.service import StagingService
from hpcstage.db import Job
from hpcstage.errors import AuthError

UID_MAX = 2**32 - 2  # uid_t; 2**32 - 1 is (uid_t)-1, "no uid"
# Slurm job ids are 32-bit; the rows of jobs and warmups are numbered by a 32-bit INTEGER
# (PostgreSQL). Bounded here, a wrong id is a 422 naming it instead of an overflow (500).
JobId = Annotated[int, Path(ge=1, le=2**32 - 1, description="a Slurm job id")]
RowId = Annotated[int, Path(ge=1, le=2**31 - 1, description="an id given by this API")]


def _utf8(value: str) -> str:
    """``value`` if it can be written as UTF-8 (JSON may carry lone surrogates: \\ud800)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("not valid Unicode text (a lone surrogate)") from exc
    return value


Text = Annotated[str, AfterValidator(_utf8)]  # a string of a request body


@dataclass(frozen=True)
class ApiState:
    """What one app's routes share: the service they front and the secrets drawn at start."""

    service: StagingService
    metrics_token: str  # "" when the site configured none: then /metrics is for admins
    session_key: bytes  # signs dashboard tokens; in memory only (a restart ends every session)
    logins: session.OnceOnly  # dashboard login tokens already traded for a session
    registry: CollectorRegistry  # /metrics of this app only (api/collector.py)
    node_usage: NodeUsage  # the dashboard's recent answers from the nodes' caches


def state(request: Request) -> ApiState:
    """The :class:`ApiState` of the app serving ``request``."""
    found = request.app.state.hpcstage
    assert isinstance(found, ApiState)
    return found


def service(request: Request) -> StagingService:
    """The staging service behind the app."""
    return state(request).service


Service = Annotated[StagingService, Depends(service)]


def database(daemon: Service) -> sessionmaker[Session]:
    """The service's state database (it is open while the API serves)."""
    assert daemon.db is not None
    return daemon.db


Database = Annotated[sessionmaker[Session], Depends(database)]


def identity(daemon: StagingService, uid: int) -> auth.Identity:
    """Who ``uid`` is: their user name, and whether they are an admin of this site."""
    user = auth.user_name(uid)
    return auth.Identity(user=user, uid=uid, admin=uid == 0 or user in daemon.settings.api.admins)


async def authenticated(daemon: StagingService, authorization: str) -> auth.Identity:
    """The user whose MUNGE credential is in ``authorization`` (every user when auth = none).

    401, audited, without a valid credential.
    """
    api = daemon.settings.api
    if api.auth == "none":
        return auth.Identity(user="anonymous", uid=-1, admin=True)
    scheme, _, credential = authorization.partition(" ")
    if scheme != auth.SCHEME or not credential:
        daemon.audit.record("auth-refused", reason="no MUNGE credential")
        raise HTTPException(401, "this API needs a MUNGE credential (use the hpcstage CLI)")
    socket = str(api.munge_socket) if api.munge_socket else None
    try:
        uid, _gid = await auth.decode(credential.strip(), socket)
    except AuthError as exc:
        daemon.audit.record("auth-refused", reason=str(exc))
        raise HTTPException(401, str(exc)) from exc
    return identity(daemon, uid)


async def caller(
    daemon: Service,
    authorization: str = Header(default=""),
    for_uid: int | None = Header(default=None, alias=auth.FOR_UID_HEADER, ge=0, le=UID_MAX),
) -> auth.Identity:
    """The authenticated user of this request (MUNGE), or 401.

    An admin may ask as another uid (``X-Hpcstage-For-Uid``): burst_buffer.lua runs as
    SlurmUser and answers `scontrol show bbstat` for whoever typed it.
    """
    me = await authenticated(daemon, authorization)
    if for_uid is None:
        return me
    if not me.admin:
        daemon.audit.record("auth-refused", user=me.user, reason="for-uid from a non-admin")
        raise HTTPException(403, "only admins may ask on behalf of another user")
    return identity(daemon, for_uid)


Caller = Annotated[auth.Identity, Depends(caller)]


def owned(job: Job | None, me: auth.Identity, what: str) -> Job:
    """``job`` if ``me`` may see it; 404 if unknown, 403 if someone else's."""
    if job is None:
        raise HTTPException(404, f"{what} is not known to hpcstage")
    if not me.admin and job.user != me.user:
        raise HTTPException(403, f"{what} belongs to another user")
    return job
