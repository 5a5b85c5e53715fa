"""The HTTP API against a fake staging service: URLs, status codes, JSON and auth.

No daemon, no cluster: the app is driven as ASGI with an in-memory-like SQLite state database
and a fake of what the API may ask of the daemon (hpcstage.api.service.StagingService).
MUNGE is replaced by a table of credentials.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hpcstage import auth
from hpcstage.api import create_app
from hpcstage.config.load import parse_config
from hpcstage.config.schema import Settings
from hpcstage.core import directives as dirs
from hpcstage.core.packing import PackRequest
from hpcstage.db import Event, Job, KeptWarm, Pack, Request, Staging, open_db
from hpcstage.db.changes import Changes
from hpcstage.errors import (
    AuthError,
    DirectiveError,
    HpcstageError,
    LimitError,
    ObjectMissingError,
)
from hpcstage.staging.keepwarm import KeepWarm, PinRequest
from hpcstage.staging.meters import Meters

USERS = {0: "root", 1000: "alice", 1001: "bob"}
CREDENTIALS = {"root-cred": 0, "alice-cred": 1000, "bob-cred": 1001}


def munge(user: str) -> dict[str, str]:
    return {"authorization": f"{auth.SCHEME} {user}-cred"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def _call(
    app: FastAPI, method: str, target: str, headers: dict[str, str], body: Any
) -> Reply:
    path, _, query = target.partition("?")
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    data = b""
    if body is not None:
        data = json.dumps(body).encode()
        raw.append((b"content-type", b"application/json"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    pending = [{"type": "http.request", "body": data, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    headers_out = {k.decode(): v.decode() for k, v in start["headers"]}
    return Reply(start["status"], headers_out, b"".join(m.get("body", b"") for m in sent[1:]))


def call(
    app: FastAPI,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> Reply:
    return asyncio.run(_call(app, method, target, headers or {}, body))


@dataclass
class FakeAudit:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


@dataclass
class FakeService:
    """What the API may ask of the daemon, answered from a table."""

    settings: Settings
    db: sessionmaker[Session] | None
    changes: Changes = field(default_factory=Changes)
    audit: FakeAudit = field(default_factory=FakeAudit)
    last_tick: float = 1234.5
    last_error: str = ""
    nodes: list[str] = field(default_factory=lambda: ["n1", "n2"])
    woken: list[bool] = field(default_factory=list)
    warmup_error: Exception | None = None
    evicted: list[str] = field(default_factory=list)
    source_error: Exception | None = None  # what check_source and evict_source raise
    dropped: list[tuple[str, list[str], str]] = field(default_factory=list)
    meters: Meters = field(default_factory=Meters)
    asked: list[int] = field(default_factory=list)

    def live_progress(self) -> dict[int, dict[str, int]]:
        return {}

    def wake(self, fresh: bool = False) -> None:
        self.woken.append(fresh)

    def job_asked(self, job_id: int) -> None:
        self.asked.append(job_id)

    async def unknown_nodes(self, nodes: Iterable[str]) -> list[str]:
        return [n for n in nodes if n not in self.nodes]

    def known_nodes(self) -> list[str]:
        return sorted(self.nodes)

    def create_warmup(self, src: str, nodes: list[str], user: str, admin: bool = False) -> int:
        if self.warmup_error is not None:
            raise self.warmup_error
        assert self.db is not None
        with self.db.begin() as session:
            job = Job(kind="warmup", user=user, name=src, nodes=",".join(nodes))
            session.add(job)
            session.flush()
            return job.id

    def create_pin(self, pin: PinRequest, user: str, admin: bool = False) -> int:
        assert self.db is not None  # the daemon's own records, on the test's database
        return KeepWarm(self.db, self.audit.record, self.wake).create(pin, user, admin)

    def remove_pin(self, pin_id: int, user: str, admin: bool = False) -> bool:
        assert self.db is not None
        return KeepWarm(self.db, self.audit.record, self.wake).remove(pin_id, user, admin)

    def create_pack(self, request: PackRequest, user: str, admin: bool = False) -> int:
        request.check()  # as the daemon: a malformed request is a DirectiveError (400)
        assert self.db is not None
        with self.db.begin() as session:
            row = Pack(user=user, src=request.src, dest=request.dest, state="queued")
            session.add(row)
            session.flush()
            return row.id

    def pack_document(self, session: Session, row: Any) -> dict[str, Any]:
        return {"id": row.id, "user": row.user, "state": row.state, "changes": 0}

    async def cache_usage(self, node: str) -> dict[str, Any]:
        if node == "n2":
            raise HpcstageError("agent down")
        return {
            "usage": {"bytes": 7, "objects": 1, "leased_bytes": 0, "leased_objects": 0},
            "stats": {"fetched_bytes": 7, "peer_bytes": 0},
            "capacity": self.settings.cache.max_bytes,
        }

    async def evict_node(self, node: str) -> int:
        self.evicted.append(node)
        return 3

    async def check_source(
        self, src: str, nodes: list[str], user: str, admin: bool = False
    ) -> dict[str, Any]:
        self._source(src)
        rows = {n: {"objects": 1, "bytes": 7, "percent": 100.0} for n in nodes}
        total = {"objects": len(nodes), "bytes": 7 * len(nodes), "percent": 100.0}
        return {"src": src, "objects": 1, "bytes": 7, "nodes": rows, "total": total}

    async def evict_source(
        self, src: str, nodes: list[str], user: str, admin: bool = False
    ) -> dict[str, Any]:
        self._source(src)
        self.dropped.append((src, nodes, user))
        fields = ("evicted", "evicted_bytes", "in_use", "in_use_bytes")
        rows = {n: dict.fromkeys(fields, 0) for n in nodes}
        return {"src": src, "nodes": rows, "total": dict.fromkeys(fields, 0)}

    def _source(self, src: str) -> None:
        if self.source_error is not None:
            raise self.source_error
        dirs.parse_value("stage-in", src)  # as the daemon: a malformed SRC is a DirectiveError

    def stage_out_buckets(self) -> list[str]:
        return []

    def store(self, bucket: str) -> Any:
        # As the real store answers a bucket the test has none of.
        raise ObjectMissingError(f"list s3://{bucket}/: no such bucket")


def site(tmp_path: Path, api: str = 'auth = "munge"') -> Settings:
    text = f"""
[site]
name = "t"
state_dir = "{tmp_path}"
[store]
endpoint_url = "http://127.0.0.1:9000"
[slurm]
poll_interval = "100ms"
[api]
admins = ["root"]
{api}
"""
    return parse_config(text)


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterable[FakeService]:
    async def decode(credential: str, socket: str | None = None) -> tuple[int, int]:
        if credential not in CREDENTIALS:
            raise AuthError("invalid credential")
        return CREDENTIALS[credential], 100

    monkeypatch.setattr(auth, "decode", decode)
    monkeypatch.setattr(auth, "user_name", USERS.__getitem__)
    db = open_db(f"sqlite:///{tmp_path / 'state.db'}")
    with db.begin() as session:
        session.add(Job(slurm_job_id=41, user="alice", name="a", first_seen=1.0))
        session.add(Job(slurm_job_id=42, user="bob", name="b", first_seen=1.0))
        session.add(Job(slurm_job_id=43, user="alice", name="old", released_at=5.0))
    yield FakeService(site(tmp_path), db)
    db.kw["bind"].dispose()


@pytest.fixture
def app(service: FakeService) -> FastAPI:
    return create_app(service)


def test_health_needs_no_credential(app: FastAPI) -> None:
    reply = call(app, "GET", "/api/v1/health")
    assert reply.status == 200
    assert reply.json()["last_tick"] == 1234.5
    assert reply.json()["last_error"] == ""


def test_requests_without_a_valid_credential_are_refused_and_audited(
    app: FastAPI, service: FakeService
) -> None:
    assert call(app, "GET", "/api/v1/jobs").status == 401
    bad = call(app, "GET", "/api/v1/jobs", {"authorization": "MUNGE nope"})
    assert (bad.status, bad.json()) == (401, {"detail": "invalid credential"})
    assert [e for e, _ in service.audit.events] == ["auth-refused", "auth-refused"]


def test_users_see_their_unfinished_jobs_admins_everyones(app: FastAPI) -> None:
    mine = call(app, "GET", "/api/v1/jobs", munge("alice")).json()
    assert [j["job_id"] for j in mine] == [41]
    everything = call(app, "GET", "/api/v1/jobs?all=true", munge("alice")).json()
    assert [j["job_id"] for j in everything] == [41, 43]
    assert [j["job_id"] for j in call(app, "GET", "/api/v1/jobs", munge("root")).json()] == [41, 42]


def test_listings_filter_by_user_and_state_in_the_daemon(app: FastAPI) -> None:
    """`hpcstage status -u/--me/-t`: the daemon answers only the jobs asked for."""

    def ids(query: str, who: str = "root") -> list[int]:
        reply = call(app, "GET", f"/api/v1/jobs?{query}", munge(who))
        assert reply.status == 200, reply
        return [j["job_id"] for j in reply.json()]

    assert ids("user=bob") == [42]
    assert ids("user=alice&user=bob&all=true") == [41, 42, 43]
    assert ids("user=bob", who="alice") == []  # a user's own jobs still, whatever they ask
    assert ids("state=pending&state=RUNNING") == [41, 42]
    assert ids("state=RUNNING") == []
    assert ids("user=alice&state=PENDING&all=true") == [41, 43]
    many = "&".join(f"user=u{i}" for i in range(101))
    assert call(app, "GET", f"/api/v1/jobs?{many}", munge("root")).status == 422
    assert call(app, "GET", f"/api/v1/jobs?user={'x' * 65}", munge("root")).status == 422


def test_one_job_is_its_owners_and_admins(app: FastAPI) -> None:
    reply = call(app, "GET", "/api/v1/jobs/41", munge("alice"))
    assert reply.status == 200
    assert (reply.json()["job_id"], reply.json()["changes"]) == (41, 0)
    assert call(app, "GET", "/api/v1/jobs/42", munge("alice")).status == 403
    assert call(app, "GET", "/api/v1/jobs/42", munge("root")).status == 200
    missing = call(app, "GET", "/api/v1/jobs/99", munge("root"))
    assert (missing.status, missing.json()["detail"]) == (404, "job 99 is not known to hpcstage")
    assert call(app, "GET", "/api/v1/jobs/41?wait=99", munge("alice")).status == 422


def test_only_admins_ask_for_another_uid(app: FastAPI, service: FakeService) -> None:
    as_alice = {**munge("root"), auth.FOR_UID_HEADER: "1000"}
    assert [j["job_id"] for j in call(app, "GET", "/api/v1/jobs", as_alice).json()] == [41]
    as_bob = {**munge("alice"), auth.FOR_UID_HEADER: "1001"}
    assert call(app, "GET", "/api/v1/jobs", as_bob).status == 403
    assert service.audit.events[-1] == (
        "auth-refused",
        {"user": "alice", "reason": "for-uid from a non-admin"},
    )


def test_ensure_wakes_the_daemon_and_answers_a_known_job(
    app: FastAPI, service: FakeService
) -> None:
    reply = call(app, "POST", "/api/v1/jobs/41/ensure", munge("alice"))
    assert (reply.status, reply.json()["job_id"]) == (200, 41)
    assert service.woken == [True]
    assert call(app, "POST", "/api/v1/jobs/42/ensure", munge("alice")).status == 403
    assert service.asked == [1]  # the row of job 41: its wait for data is timed, not 42's
    unknown = call(app, "POST", "/api/v1/jobs/77/ensure", munge("alice"))
    assert unknown.status == 404
    assert "no staging directives" in unknown.json()["detail"]


def test_ensure_of_a_rerun_the_daemon_has_not_seen_is_asked_again(app: FastAPI) -> None:
    # Job 41's row records its first run (0 restarts); its re-run after a requeue asks.
    rerun = call(app, "POST", "/api/v1/jobs/41/ensure?restarts=1", munge("alice"))
    assert (rerun.status, rerun.headers.get("retry-after")) == (503, "5")
    assert "earlier run is still being wound up" in rerun.json()["detail"]
    first = call(app, "POST", "/api/v1/jobs/41/ensure?restarts=0", munge("alice"))
    assert first.status == 200
    bad = call(app, "POST", "/api/v1/jobs/41/ensure?restarts=-1", munge("alice"))
    assert bad.status == 422 and "restarts" in str(bad.json())


def test_warmups_are_created_refused_and_followed(app: FastAPI, service: FakeService) -> None:
    body = {"src": "s3://b/k", "nodes": ["n1"]}
    created = call(app, "POST", "/api/v1/warmups", munge("alice"), body)
    assert created.status == 201
    warm_id = created.json()["id"]
    status = call(app, "GET", f"/api/v1/warmups/{warm_id}", munge("alice"))
    assert (status.status, status.json()["kind"]) == (200, "warmup")
    assert call(app, "GET", f"/api/v1/warmups/{warm_id}", munge("bob")).status == 403
    assert call(app, "GET", "/api/v1/warmups/1", munge("alice")).status == 404  # a job's id
    unknown = call(app, "POST", "/api/v1/warmups", munge("alice"), {**body, "nodes": ["zz"]})
    assert unknown.status == 400
    assert "Slurm has no node zz (its nodes: n1, n2)" in unknown.json()["detail"]
    assert call(app, "POST", "/api/v1/warmups", munge("alice"), {**body, "nodes": []}).status == 422


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (DirectiveError("bad src"), 400),
        (PermissionError("refused"), 403),
        (LimitError("too many"), 429),
    ],
)
def test_warmup_refusals_have_their_status(
    app: FastAPI, service: FakeService, error: Exception, status: int
) -> None:
    service.warmup_error = error
    reply = call(
        app, "POST", "/api/v1/warmups", munge("alice"), {"src": "s3://b/k", "nodes": ["n1"]}
    )
    named = "src: " if status == 400 else ""  # a malformed SRC: the field is named
    assert (reply.status, reply.json()["detail"]) == (status, f"{named}{error}")
    if status == 429:
        assert reply.headers["retry-after"] == "60"


def test_nodes_their_caches_and_eviction(app: FastAPI, service: FakeService) -> None:
    assert call(app, "GET", "/api/v1/nodes", munge("alice")).json() == ["n1", "n2"]
    cache = call(app, "GET", "/api/v1/nodes/n1/cache", munge("alice"))
    assert (cache.status, cache.json()["usage"]["bytes"]) == (200, 7)
    assert call(app, "GET", "/api/v1/nodes/nx/cache", munge("alice")).status == 404
    down = call(app, "GET", "/api/v1/nodes/n2/cache", munge("alice"))
    assert (down.status, down.json()["detail"]) == (502, "cannot reach the agent on n2: agent down")
    assert call(app, "POST", "/api/v1/nodes/n1/evict", munge("alice")).status == 403
    evict = call(app, "POST", "/api/v1/nodes/n1/evict", munge("root"))
    assert (evict.status, evict.json(), service.evicted) == (200, {"evicted": 3}, ["n1"])
    # A name Slurm does not know is never logged in to ("1.5" resolves to an address).
    assert call(app, "POST", "/api/v1/nodes/1.5/evict", munge("root")).status == 404
    assert service.evicted == ["n1"]


def test_a_source_is_checked_on_known_nodes_only(app: FastAPI, service: FakeService) -> None:
    body = {"src": "s3://data/p/", "nodes": ["n1", "n2"]}
    done = call(app, "POST", "/api/v1/cache/check", munge("alice"), body)
    assert done.status == 200
    assert done.json()["nodes"]["n2"] == {"objects": 1, "bytes": 7, "percent": 100.0}
    unknown = call(app, "POST", "/api/v1/cache/check", munge("alice"), {**body, "nodes": ["zz"]})
    assert unknown.status == 400
    assert "cache check of s3://data/p/: Slurm has no node zz" in unknown.json()["detail"]
    bad = call(app, "POST", "/api/v1/cache/check", munge("alice"), {**body, "src": "data/p"})
    assert bad.status == 400 and bad.json()["detail"].startswith("src: ")


@pytest.mark.parametrize("route", ["check", "evict"])
@pytest.mark.parametrize(
    ("error", "status"),
    [
        (PermissionError("cache evict of s3://data/p/ refused: no policy rule"), 403),
        (DirectiveError("covers S3 sources only"), 400),
        (ObjectMissingError("no objects under s3://data/p/"), 404),
        (HpcstageError("store down"), 502),
    ],
)
def test_source_refusals_have_their_status(
    app: FastAPI, service: FakeService, route: str, error: Exception, status: int
) -> None:
    service.source_error = error
    body = {"src": "s3://data/p/", "nodes": ["n1"]}
    reply = call(app, "POST", f"/api/v1/cache/{route}", munge("alice"), body)
    if route == "evict" and status == 404:
        status = 502  # evicting reads no listing: a missing object is just a store error
    named = "" if status == 403 else "src: "
    assert (reply.status, reply.json()["detail"]) == (status, f"{named}{error}")


def test_evicting_a_source_defaults_to_every_node(app: FastAPI, service: FakeService) -> None:
    done = call(app, "POST", "/api/v1/cache/evict", munge("bob"), {"src": "s3://data/p/"})
    assert done.status == 200
    assert service.dropped == [("s3://data/p/", ["n1", "n2"], "bob")]
    one = call(
        app, "POST", "/api/v1/cache/evict", munge("bob"), {"src": "s3://data/k", "nodes": ["n2"]}
    )
    assert one.status == 200 and service.dropped[-1] == ("s3://data/k", ["n2"], "bob")
    assert (
        call(
            app, "POST", "/api/v1/cache/evict", munge("bob"), {"src": "s3://data/k", "nodes": []}
        ).status
        == 422
    )


def test_trash_listing_and_a_bad_restore(app: FastAPI) -> None:
    listing = call(app, "GET", "/api/v1/trash", munge("alice"))
    assert (listing.status, listing.json()) == (200, {"entries": [], "next": ""})
    assert call(app, "GET", "/api/v1/trash?limit=0", munge("alice")).status == 422
    bad = call(app, "POST", "/api/v1/trash/restore", munge("alice"), {"url": "s3://b/not-trash"})
    assert bad.status == 400


def test_metrics_for_admins_and_the_scrape_token(tmp_path: Path, service: FakeService) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    service.settings = site(tmp_path, f'metrics_token_file = "{token}"')
    app = create_app(service)
    scraped = call(app, "GET", "/metrics", {"authorization": "Bearer 0123456789abcdef0123"})
    assert scraped.status == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    assert "hpcstage_last_tick_timestamp_seconds 1234.5\n" in scraped.body.decode()
    assert 'hpcstage_jobs{state="PENDING"} 2.0' in scraped.body.decode()
    assert call(app, "GET", "/metrics", {"authorization": "Bearer wrong"}).status == 401
    assert call(app, "GET", "/metrics", munge("alice")).status == 403
    assert call(app, "GET", "/metrics", munge("root")).status == 200
    assert call(app, "GET", "/metrics").status == 401


def test_dashboard_login_once_then_a_session_cookie(app: FastAPI) -> None:
    assert call(app, "GET", "/").status == 401
    token = call(app, "POST", "/api/v1/dashboard/login", munge("alice")).json()["token"]
    login = call(app, "GET", f"/login?token={token}")
    assert (login.status, login.headers["location"]) == (303, "/")
    cookie = login.headers["set-cookie"].split(";")[0]
    assert "HttpOnly" in login.headers["set-cookie"]
    assert call(app, "GET", f"/login?token={token}").status == 401  # once only
    page = call(app, "GET", "/", {"cookie": cookie})
    assert page.status == 200
    assert "as seen by alice" in page.body.decode()
    assert ">b<" not in page.body.decode()  # bob's job


def test_the_dashboard_document_needs_a_login_and_holds_the_viewers_jobs_only(
    app: FastAPI, service: FakeService
) -> None:
    assert service.db is not None
    with service.db.begin() as session:
        alices, bobs = (session.scalar(select(Job).where(Job.slurm_job_id == i)) for i in (41, 42))
        assert alices is not None and bobs is not None
        alices.requests.append(Request(src="s3://d/x/", dest="x", direction="in"))
        alices.requests[0].stagings.append(
            Staging(node="n1", state="running", files_done=3, files_total=10, bytes_done=300)
        )
        session.add(Event(ts=2.0, job_id=alices.id, level="error", message="alice's error"))
        session.add(Event(ts=3.0, job_id=bobs.id, level="error", message="bob's <secret>"))
        session.add(Event(ts=4.0, job_id=alices.id, level="info", message="fine"))
    assert call(app, "GET", "/api/v1/dashboard").status == 401
    assert call(app, "GET", "/api/v1/dashboard", {"cookie": "hpcstage_session=x.y"}).status == 401
    doc = call(app, "GET", "/api/v1/dashboard", munge("alice")).json()
    assert (doc["viewer"], doc["admin"]) == ("alice", False)
    assert [j["job_id"] for j in doc["jobs"]] == [43, 41]
    assert [e["message"] for e in doc["errors"]] == ["alice's error"]
    assert [j["job_id"] for j in doc["staging"]] == [41]
    assert doc["staging"][0]["progress"]["n1"] == {
        "state": "staging",
        "files_done": 3,
        "files_total": 10,
        "bytes_done": 300,
        "bytes_total": None,  # not listed yet
    }
    nodes = {n["node"]: n for n in doc["nodes"]}
    assert (nodes["n1"]["bytes"], nodes["n2"]["error"]) == (7, "agent down")
    admin = call(app, "GET", "/api/v1/dashboard", munge("root")).json()
    assert [e["message"] for e in admin["errors"]] == ["bob's <secret>", "alice's error"]
    token = call(app, "POST", "/api/v1/dashboard/login", munge("bob")).json()["token"]
    cookie = call(app, "GET", f"/login?token={token}").headers["set-cookie"].split(";")[0]
    assert call(app, "GET", "/api/v1/dashboard", {"cookie": cookie}).json()["viewer"] == "bob"
    page = call(app, "GET", "/", {"cookie": cookie}).body.decode()
    assert "bob&#x27;s &lt;secret&gt;" in page and "alice" not in page, page
    assert "3/10 files" not in page and "agent down" in page


def test_without_auth_everyone_is_an_anonymous_admin(tmp_path: Path, service: FakeService) -> None:
    service.settings = site(tmp_path, 'auth = "none"')
    app = create_app(service)
    assert [j["job_id"] for j in call(app, "GET", "/api/v1/jobs").json()] == [41, 42]
    assert call(app, "POST", "/api/v1/dashboard/login").json() == {"token": ""}
    assert call(app, "GET", "/").status == 200
    assert call(app, "GET", "/metrics").status == 200


def test_only_admins_keep_datasets_warm(app: FastAPI, service: FakeService) -> None:
    body = {"src": "s3://datasets/data/", "nodes": ["n1", "n2", "n1"], "schedule": "every 6h"}
    refused = call(app, "POST", "/api/v1/pins", munge("alice"), body)
    assert refused.status == 403
    assert "only admins may keep datasets warm" in refused.json()["detail"]
    assert service.audit.events[-1][0] == "refused"  # audited
    assert call(app, "GET", "/api/v1/pins", munge("alice")).status == 403
    created = call(app, "POST", "/api/v1/pins", munge("root"), body)
    assert created.status == 201, created
    pin_id = created.json()["id"]
    (doc,) = call(app, "GET", "/api/v1/pins", munge("root")).json()
    assert (doc["id"], doc["src"], doc["nodes"]) == (pin_id, "s3://datasets/data/", ["n1", "n2"])
    assert (doc["schedule"], doc["state"], doc["created_by"]) == ("every 6h", "staging", "root")
    assert doc["next_refresh_at"] == pytest.approx(doc["created_at"] + 6 * 3600)
    # The pin is a job of kind "pin" planned on its nodes (staged by the next tick).
    with service.db.begin() as session:  # type: ignore[union-attr]
        job = session.get_one(Job, pin_id)
        assert (job.kind, job.planned_nodes, job.user) == ("pin", "n1,n2", "root")
    assert call(app, "DELETE", f"/api/v1/pins/{pin_id}", munge("alice")).status == 403
    removed = call(app, "DELETE", f"/api/v1/pins/{pin_id}", munge("root"))
    assert (removed.status, removed.json()) == (200, {"id": pin_id, "removed": True})
    assert call(app, "DELETE", f"/api/v1/pins/{pin_id}", munge("root")).status == 404
    assert call(app, "GET", "/api/v1/pins", munge("root")).json() == []
    (gone,) = call(app, "GET", "/api/v1/pins?removed=true", munge("root")).json()
    assert gone["state"] == "released"
    with service.db.begin() as session:  # type: ignore[union-attr]
        assert session.get_one(Job, pin_id).ended_at is not None  # the planner releases it


@pytest.mark.parametrize(
    ("field_", "value", "says"),
    [
        ("schedule", "0 25 * * *", "schedule: hour: 25 is outside 0-23"),
        ("schedule", "every 5s", "schedule: 'every 5s': at least every 30s"),
        ("until", 1000.0, "until: "),
        ("src", "s3://", "src: "),
        ("nodes", ["zz"], "Slurm has no node zz (its nodes: n1, n2)"),
    ],
)
def test_a_pin_refused_names_the_field(app: FastAPI, field_: str, value: Any, says: str) -> None:
    body = {"src": "s3://datasets/data/", "nodes": ["n1"], field_: value}
    refused = call(app, "POST", "/api/v1/pins", munge("root"), body)
    assert refused.status == 400, refused
    assert says in refused.json()["detail"]


def test_a_pin_is_refreshed_when_due_and_released_after_until(service: FakeService) -> None:
    assert service.db is not None
    keep = KeepWarm(service.db, service.audit.record, lambda: None)
    now = time.time()
    pin_id = keep.create(
        PinRequest("s3://datasets/d/", ["n1"], "every 1h", now + 7200), "root", True
    )
    with service.db.begin() as session:
        request = session.scalars(select(Request).where(Request.job_id == pin_id)).one()
        session.add(Staging(request_id=request.id, node="n1", state="ready", files_done=3))
    assert keep.run_due(now + 60) == 0  # not due yet
    assert keep.run_due(now + 3601) == 1
    with service.db.begin() as session:
        st = session.scalars(select(Staging).where(Staging.request_id == request.id)).one()
        assert st.state == "queued"  # the planner stages it again: the prefix is listed anew
        pin = session.get_one(KeptWarm, pin_id)
        assert pin.last_refresh_at == now + 3601
        assert pin.next_refresh_at == now + 3601 + 3600
    assert keep.run_due(now + 7201) == 1  # past "until": released
    with service.db.begin() as session:
        assert session.get_one(KeptWarm, pin_id).removed_at == now + 7201
        assert session.get_one(Job, pin_id).ended_at == now + 7201
