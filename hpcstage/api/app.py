"""Routes. Each one reads the database or asks the daemon; no staging logic lives here."""

from __future__ import annotations

import asyncio
import hmac
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from hpcstage import __version__, auth
from hpcstage.api import session
from hpcstage.api.dashboard import render_dashboard, render_login_needed
from hpcstage.api.status import job_document, job_summary
from hpcstage.core import policy
from hpcstage.db import Job, Staging
from hpcstage.errors import ConfigError, DirectiveError, HpcstageError, LimitError
from hpcstage.staging import trash
from hpcstage.store.protocol import parse_s3_url

if TYPE_CHECKING:
    from hpcstage.service.daemon import Daemon

UNKNOWN_JOB_WAIT = 2.5  # poll intervals to wait for a job the daemon has not seen yet
MAX_WAIT = 20.0  # seconds a long-polling request may wait (the CLI's HTTP timeout is 30)
JOB_ID_DIGITS = 10  # Slurm job ids are 32-bit: longer digit strings are no job of ours

SINCE = Query(
    None, description="`changes` of an earlier answer: wait until the job changes after it"
)
WAIT = Query(0.0, ge=0, le=MAX_WAIT, description="seconds to wait at most (with since)")


class WarmupIn(BaseModel):
    """Body of POST /api/v1/warmups."""

    src: str = Field(description="s3://bucket/key, s3://bucket/prefix/ or /shared/path")
    nodes: list[str] = Field(min_length=1, description="node names, expanded")


class RestoreIn(BaseModel):
    """Body of POST /api/v1/trash/restore."""

    url: str = Field(description="s3://bucket/<trash_prefix><day>/<job>~<version>/<key>")


def create_app(daemon: Daemon) -> FastAPI:
    """The API of one running daemon."""
    app = FastAPI(title="hpcstage", version=__version__, docs_url="/api/docs")

    def db() -> Any:
        assert daemon.db is not None
        return daemon.db

    async def caller(
        authorization: str = Header(default=""),
        for_uid: int | None = Header(default=None, alias=auth.FOR_UID_HEADER),
    ) -> auth.Identity:
        """The authenticated user of this request (MUNGE), or 401.

        An admin may ask as another uid (``X-Hpcstage-For-Uid``): burst_buffer.lua runs as
        SlurmUser and answers `scontrol show bbstat` for whoever typed it.
        """
        me = await authenticated(authorization)
        if for_uid is None:
            return me
        if not me.admin:
            daemon.audit.record("auth-refused", user=me.user, reason="for-uid from a non-admin")
            raise HTTPException(403, "only admins may ask on behalf of another user")
        return identity(for_uid)

    def identity(uid: int) -> auth.Identity:
        user = auth.user_name(uid)
        return auth.Identity(
            user=user, uid=uid, admin=uid == 0 or user in daemon.settings.api.admins
        )

    async def authenticated(authorization: str) -> auth.Identity:
        api = daemon.settings.api
        if api.auth == "none":
            return auth.Identity(user="anonymous", uid=-1, admin=True)
        scheme, _, credential = authorization.partition(" ")
        if scheme != auth.SCHEME or not credential:
            daemon.audit.record("auth-refused", reason="no MUNGE credential")
            raise HTTPException(401, "this API needs a MUNGE credential (use the hpcstage CLI)")
        try:
            uid, _gid = await auth.decode(credential.strip(), _socket(api.munge_socket))
        except auth.AuthError as exc:
            daemon.audit.record("auth-refused", reason=str(exc))
            raise HTTPException(401, str(exc)) from exc
        return identity(uid)

    def owned(job: Job | None, me: auth.Identity, what: str) -> Job:
        """``job`` if ``me`` may see it; 404 if unknown, 403 if someone else's."""
        if job is None:
            raise HTTPException(404, f"{what} is not known to hpcstage")
        if not me.admin and job.user != me.user:
            raise HTTPException(403, f"{what} belongs to another user")
        return job

    @app.get("/api/v1/health")
    async def health() -> dict[str, Any]:
        """Liveness: version and when the last queue snapshot was taken."""
        return {
            "version": __version__,
            "last_tick": daemon.last_tick,
            "last_error": daemon.last_error,
        }

    @app.get("/api/v1/jobs")
    async def jobs(
        all: bool = False,
        me: auth.Identity = Depends(caller),
    ) -> list[dict[str, Any]]:
        """Your jobs with directives (admins: everyone's); unfinished ones unless ?all=true."""
        with db().begin() as session:
            query = select(Job).order_by(Job.id)
            if not all:
                query = query.where(Job.released_at.is_(None))
            if not me.admin:
                query = query.where(Job.user == me.user)
            return [job_summary(j) for j in session.scalars(query)]

    def document(session: Session, job: Job) -> dict[str, Any]:
        """A job's status document with live progress and the daemon's change count."""
        doc = job_document(session, job, live=daemon.live_progress())
        doc["changes"] = daemon.changes.count
        return doc

    async def followed(key: int, since: int | None, wait: float) -> dict[str, Any]:
        """Job ``key``'s document once it changed after ``since`` or ``wait`` s passed."""
        await daemon.changes.wait(key, since, wait)
        with db().begin() as session:
            return document(session, session.get_one(Job, key))

    @app.get("/api/v1/jobs/{job_id}")
    async def job(
        job_id: int,
        since: int | None = SINCE,
        wait: float = WAIT,
        me: auth.Identity = Depends(caller),
    ) -> dict[str, Any]:
        """One Slurm job: state, each input per node with progress, errors, events.

        With ``since`` (the ``changes`` of an earlier answer) and ``wait``, the answer waits
        until the daemon has committed a change to this job since, for at most ``wait``
        seconds (long polling: how ``hpcstage env`` and ``warmup`` follow a staging).
        """
        with db().begin() as session:
            found = session.scalar(select(Job).where(Job.slurm_job_id == job_id))
            key = owned(found, me, f"job {job_id}").id
        return await followed(key, since, wait)

    @app.post("/api/v1/jobs/{job_id}/ensure")
    async def ensure(job_id: int, me: auth.Identity = Depends(caller)) -> dict[str, Any]:
        """A job asks for its inputs now (from ``hpcstage env``): look at the queue at once."""
        deadline = time.monotonic() + UNKNOWN_JOB_WAIT * daemon.settings.slurm.poll_interval
        while True:
            daemon.wake(fresh=True)
            late = time.monotonic() > deadline
            with db().begin() as session:
                found = session.scalar(select(Job).where(Job.slurm_job_id == job_id))
                # A job that asks runs: an ended row with its id may be an older job Slurm
                # gave the id before (see hpcstage.watch.fold), not yet replaced by the daemon.
                if (
                    found is not None
                    and found.replaced_at is None
                    and (found.ended_at is None or late)
                ):
                    return document(session, owned(found, me, f"job {job_id}"))
            if late:
                raise HTTPException(
                    404,
                    f"job {job_id} is not known to hpcstage: it has no staging directives"
                    " the daemon can read (see `hpcstage status` and the daemon log)",
                )
            await asyncio.sleep(0.5)

    @app.post("/api/v1/warmups", status_code=201)
    async def warmup(body: WarmupIn, me: auth.Identity = Depends(caller)) -> dict[str, Any]:
        """Stage SRC onto NODES ahead of any job; poll GET /api/v1/warmups/{id}."""
        unknown = await daemon.unknown_nodes(body.nodes)
        if unknown:
            known = daemon.known_nodes()
            more = f" and {len(known) - 20} more" if len(known) > 20 else ""
            shown = ", ".join(known[:20]) + more
            raise HTTPException(
                400,
                f"warmup of {body.src}: Slurm has no node {', '.join(unknown[:20])}"
                f" (its nodes: {shown})",
            )
        try:
            warm_id = daemon.create_warmup(body.src, body.nodes, me.user, me.admin)
        except DirectiveError as exc:
            raise HTTPException(400, str(exc)) from exc
        except PermissionError as exc:
            raise HTTPException(403, str(exc)) from exc
        except LimitError as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": "60"}) from exc
        return {"id": warm_id}

    @app.get("/api/v1/warmups/{warm_id}")
    async def warmup_status(
        warm_id: int,
        since: int | None = SINCE,
        wait: float = WAIT,
        me: auth.Identity = Depends(caller),
    ) -> dict[str, Any]:
        """Progress of one warmup per node (``since``/``wait``: as for a job)."""
        with db().begin() as session:
            found = session.get(Job, warm_id)
            if found is not None and found.kind != "warmup":
                found = None
            owned(found, me, f"warmup {warm_id}")
        return await followed(warm_id, since, wait)

    @app.get("/api/v1/nodes")
    async def nodes(me: auth.Identity = Depends(caller)) -> list[str]:
        """Node names as Slurm reports them."""
        return daemon.known_nodes()

    @app.get("/api/v1/nodes/{node}/cache")
    async def node_cache(node: str, me: auth.Identity = Depends(caller)) -> dict[str, Any]:
        """One node's cache: bytes and objects (leased and total), job directories, counters."""
        if node not in daemon.known_nodes():
            raise HTTPException(404, f"no node {node} in Slurm")
        try:
            return await daemon.cache_usage(node)
        except (HpcstageError, TimeoutError) as exc:
            raise HTTPException(502, f"cannot reach the agent on {node}: {exc}") from exc

    @app.post("/api/v1/nodes/{node}/evict")
    async def evict_node(node: str, me: auth.Identity = Depends(caller)) -> dict[str, int]:
        """Admins: apply the eviction policy on NODE now (leased data is never evicted)."""
        if not me.admin:
            raise HTTPException(403, "only admins may trigger eviction")
        try:
            # This node only: an admin's request does not wait for every other node's pass.
            return {"evicted": await daemon.evict_node(node)}
        except (HpcstageError, TimeoutError) as exc:
            raise HTTPException(502, f"cannot reach the agent on {node}: {exc}") from exc

    @app.get("/api/v1/trash")
    async def trash_list(
        bucket: str | None = None,
        limit: int = Query(trash.PAGE, ge=1, le=trash.PAGE, description="keys to examine"),
        after: str = Query("", description="`next` of the previous page"),
        me: auth.Identity = Depends(caller),
    ) -> dict[str, Any]:
        """Objects that your jobs' stage-outs replaced (admins: all), kept for the retention,
        one page at a time: ``next`` is '' after the last page. A page examines at most
        ``limit`` recycle-bin keys, so it may hold fewer entries (even none) before the end."""
        buckets = [bucket] if bucket else daemon.stage_out_buckets()
        try:
            page = await trash.list_page(
                buckets, daemon.store, daemon.settings.stage_out.trash_prefix, after, limit
            )
        except (ValueError, HpcstageError) as exc:
            raise HTTPException(400, str(exc)) from exc
        owners = {} if me.admin else bin_owners({(e.job, e.day) for e in page.entries})
        shown = [
            e.as_dict()
            for e in page.entries
            if me.admin or _user(owners.get((e.job, e.day))) == me.user
        ]
        return {"entries": shown, "next": page.next}

    def bin_owners(entries: set[tuple[str, str]]) -> dict[tuple[str, str], trash.BinJob]:
        """The job behind each (Slurm job id, day) of recycle-bin entries, in one query. Ids
        are given again, so every job that held the id is a candidate (trash.owner_of)."""
        ids = {
            int(j) for j, _ in entries if j.isascii() and j.isdigit() and len(j) <= JOB_ID_DIGITS
        }
        if not ids:
            return {}
        query = select(
            Job.slurm_job_id, Job.former_slurm_job_id, Job.user, Job.account, Job.ended_at
        ).where(or_(Job.slurm_job_id.in_(ids), Job.former_slurm_job_id.in_(ids)))
        held: dict[str, list[trash.BinJob]] = {}
        with db().begin() as session:
            for now, before, user, account, ended in session.execute(query.order_by(Job.id)):
                held.setdefault(str(now or before), []).append(
                    trash.BinJob(user, account or "", ended)
                )
        found = {(j, d): trash.owner_of(d, held.get(j, [])) for j, d in entries}
        return {entry: job for entry, job in found.items() if job is not None}

    def may_not_restore(job_key: str, day: str, me: auth.Identity, url: str) -> str:
        """Why ``me`` may not restore an entry to ``url`` ("": may): it must be from ``me``'s
        job, and today's policy must let ``me`` write there (a restore writes the key again,
        and the rules may have changed since). Admins run the site and may restore anything."""
        if me.admin:
            return ""
        job = bin_owners({(job_key, day)}).get((job_key, day))
        if job is None or job.user != me.user:
            return "that recycle-bin entry belongs to another user's job"
        decision = policy.check(daemon.settings.policy, me.user, job.account, "write", url)
        return "" if decision.allowed else f"restore refused: {decision.rule}"

    @app.post("/api/v1/trash/restore")
    async def trash_restore(body: RestoreIn, me: auth.Identity = Depends(caller)) -> dict[str, str]:
        """Put a recycle-bin entry back at its key (what is there now goes to the bin)."""
        prefix = daemon.settings.stage_out.trash_prefix
        try:
            bucket, key = parse_s3_url(body.url)
            day, job_key, original = trash.parse_trash_key(prefix, key)
            refused = may_not_restore(job_key, day, me, f"s3://{bucket}/{original}")
            if refused:
                raise HTTPException(403, refused)
            async with daemon.store(bucket) as store:
                done = await trash.restore(store, prefix, key)
        except (ValueError, HpcstageError) as exc:
            raise HTTPException(400, str(exc)) from exc
        daemon.audit.record("trash-restore", user=me.user, bucket=bucket, **done)
        return done

    metrics_token = _read_token(daemon.settings.api.metrics_token_file)

    async def scraper(authorization: str = Header(default="")) -> None:
        """/metrics' reader: the site's scrape token, or an admin's MUNGE credential."""
        scheme, _, given = authorization.partition(" ")
        if scheme == "Bearer" and metrics_token:
            if hmac.compare_digest(given.strip().encode(), metrics_token.encode()):
                return
            daemon.audit.record("auth-refused", reason="wrong metrics token")
            raise HTTPException(401, "wrong metrics token")
        me = await caller(authorization, None)
        if not me.admin:
            raise HTTPException(403, "metrics are for admins and the site's scraper")

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(scraper)])
    async def metrics() -> str:
        """Prometheus text format (api.metrics_token_file's token as a Bearer, or an admin)."""
        with db().begin() as session:
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

    session_key = session.new_key()  # in memory only: a restart ends every browser session
    logins = session.OnceOnly()

    @app.post("/api/v1/dashboard/login")
    async def dashboard_login(me: auth.Identity = Depends(caller)) -> dict[str, str]:
        """A one-minute, single-use token that opens the dashboard as you (GET /login?token=)."""
        if me.uid < 0:  # api.auth = "none": the page needs no login
            return {"token": ""}
        daemon.audit.record("dashboard-login", user=me.user)
        return {"token": session.issue(session_key, "login", me.uid, time.time())}

    @app.get("/login")
    async def login(token: str = "") -> Response:
        """Trade a login token for a session cookie, then show the dashboard."""
        now = time.time()
        try:
            claims = session.verify(session_key, token, "login", now)
            logins.spend(claims, now)
        except auth.AuthError as exc:
            daemon.audit.record("auth-refused", reason=f"dashboard: {exc}")
            return HTMLResponse(render_login_needed(str(exc)), status_code=401)
        reply = RedirectResponse("/", status_code=303)
        reply.set_cookie(
            session.COOKIE,
            session.issue(session_key, "session", claims.uid, now),
            max_age=session.SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=daemon.settings.api.url.startswith("https:"),
        )
        return reply

    def viewer(cookie: str | None) -> auth.Identity:
        """Who the dashboard is for: the session cookie's user; AuthError without one."""
        if daemon.settings.api.auth == "none":
            return auth.Identity(user="anonymous", uid=-1, admin=True)
        if not cookie:
            raise auth.AuthError("the dashboard needs a login")
        return identity(session.verify(session_key, cookie, "session", time.time()).uid)

    @app.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request) -> Response:
        """A page for people: their jobs (admins: all) and staging, refreshed every few seconds."""
        try:
            me = viewer(request.cookies.get(session.COOKIE))
        except auth.AuthError as exc:
            return HTMLResponse(render_login_needed(str(exc)), status_code=401)
        with db().begin() as db_session:
            query = select(Job).order_by(Job.id.desc()).limit(200)
            if not me.admin:
                query = query.where(Job.user == me.user)
            docs = [job_summary(j) for j in db_session.scalars(query)]
        return HTMLResponse(render_dashboard(docs, __version__, me.user))

    return app


def _user(job: trash.BinJob | None) -> str | None:
    return job.user if job is not None else None


def _socket(path: object) -> str | None:
    return str(path) if path else None


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
