"""The dashboard: a page at / for people, opened with a one-time login token the CLI asks
for (``hpcstage dashboard``) and then a session cookie (see :mod:`hpcstage.api.session`)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy.orm import Session, sessionmaker

from hpcstage import __version__, auth
from hpcstage.api import session
from hpcstage.api.dashboard import render_dashboard, render_login_needed
from hpcstage.api.deps import ApiState, Caller, Database, authenticated, identity, state
from hpcstage.api.overview import overview
from hpcstage.errors import AuthError

router = APIRouter()


@router.post("/api/v1/dashboard/login")
async def dashboard_login(me: Caller, shared: ApiState = Depends(state)) -> dict[str, str]:
    """A one-minute, single-use token that opens the dashboard as you (GET /login?token=)."""
    if me.uid < 0:  # api.auth = "none": the page needs no login
        return {"token": ""}
    shared.service.audit.record("dashboard-login", user=me.user)
    return {"token": session.issue(shared.session_key, "login", me.uid, time.time())}


@router.get("/login")
async def login(shared: ApiState = Depends(state), token: str = "") -> Response:
    """Trade a login token for a session cookie, then show the dashboard."""
    now = time.time()
    try:
        claims = session.verify(shared.session_key, token, "login", now)
        shared.logins.spend(claims, now)
    except AuthError as exc:
        shared.service.audit.record("auth-refused", reason=f"dashboard: {exc}")
        return HTMLResponse(render_login_needed(str(exc)), status_code=401)
    reply = RedirectResponse("/", status_code=303)
    reply.set_cookie(
        session.COOKIE,
        session.issue(shared.session_key, "session", claims.uid, now),
        max_age=session.SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=shared.service.settings.api.url.startswith("https:"),
    )
    return reply


def viewer(shared: ApiState, cookie: str | None) -> auth.Identity:
    """Who the dashboard is for: the session cookie's user; AuthError without one."""
    if shared.service.settings.api.auth == "none":
        return auth.Identity(user="anonymous", uid=-1, admin=True)
    if not cookie:
        raise AuthError("the dashboard needs a login")
    uid = session.verify(shared.session_key, cookie, "session", time.time()).uid
    return identity(shared.service, uid)


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request, db: Database, shared: ApiState = Depends(state)) -> Response:
    """A page for people: caches, staging, waits and errors of their jobs (admins: all),
    refreshed in place every few seconds."""
    try:
        me = viewer(shared, request.cookies.get(session.COOKIE))
    except AuthError as exc:
        return HTMLResponse(render_login_needed(str(exc)), status_code=401)
    return HTMLResponse(render_dashboard(await _document(shared, db, me), __version__))


@router.get("/api/v1/dashboard")
async def dashboard_data(
    request: Request,
    db: Database,
    shared: ApiState = Depends(state),
    authorization: str = Header(default=""),
) -> dict[str, Any]:
    """What the page at / shows, as JSON: for its session cookie, or a MUNGE credential."""
    cookie = request.cookies.get(session.COOKIE)
    try:
        me = viewer(shared, cookie) if cookie or not authorization else None
    except AuthError as exc:
        raise HTTPException(401, str(exc)) from exc
    if me is None:
        me = await authenticated(shared.service, authorization)
    return await _document(shared, db, me)


async def _document(
    shared: ApiState, db: sessionmaker[Session], me: auth.Identity
) -> dict[str, Any]:
    """The dashboard document for ``me``: the database's part, then the node caches'."""
    daemon = shared.service
    with db.begin() as db_session:
        doc = overview(db_session, me, daemon.live_progress(), time.time())
    doc["site"] = daemon.settings.site.name
    doc["last_tick"] = daemon.last_tick
    doc["last_error"] = daemon.last_error if me.admin else ""
    doc["nodes"] = await shared.node_usage.rows(daemon.known_nodes())
    return doc
