"""Every route of the API against malformed input: a 4xx naming the parameter, never a 500.

The requests come from tests/api_fuzz.py, which reads the routes off the app; here they go
to the app as ASGI over the fake daemon of test_api.py (tests/integration/test_api_hostile.py
sends them to a real daemon).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote

import pytest
from fastapi import FastAPI

from hpcstage.api import create_app
from tests import api_fuzz
from tests.unit import test_api as base
from tests.unit.test_api import Reply, munge

service = base.service  # the fixture: the fake daemon and its database


@pytest.fixture
def app(service: base.FakeService) -> FastAPI:
    return create_app(service)


async def _send(app: FastAPI, case: api_fuzz.Case) -> Reply:
    headers = dict(munge("root"))
    headers.update(case.headers)
    raw = [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()]
    if case.body is not None:
        raw.append((b"content-type", b"application/json"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": case.method,
        "scheme": "http",
        "path": unquote(case.raw_path),  # as uvicorn decodes it
        "raw_path": case.raw_path.encode(),
        "query_string": case.query.encode(),
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    pending = [{"type": "http.request", "body": case.body or b"", "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await app(scope, receive, send)
    except Exception as exc:  # what the server would answer with a 500
        return Reply(500, {}, repr(exc).encode())
    start = sent[0]
    return Reply(start["status"], {}, b"".join(m.get("body", b"") for m in sent[1:]))


def test_the_cases_cover_every_route_and_parameter(app: FastAPI) -> None:
    cases = list(api_fuzz.cases(app.openapi()))
    spoilt = {(c.raw_path, c.param) for c in cases}
    assert len(api_fuzz.routes(app.openapi())) >= 12
    for param in ("job_id", "node", "since", "wait", "limit", "bucket", "after", "src", "nodes"):
        assert any(p == param for _, p in spoilt), param
    assert any(p.lower() == "x-hpcstage-for-uid" for _, p in spoilt)


def test_no_malformed_request_gets_a_500_and_refusals_name_the_parameter(app: FastAPI) -> None:
    wrong = []
    for case in api_fuzz.cases(app.openapi()):
        reply = asyncio.run(_send(app, case))
        if reply.status >= 500 or not api_fuzz.names_param(reply.status, reply.body, case.param):
            wrong.append(f"{case.describe()} -> {reply.status} {reply.body[:300]!r}")
    assert not wrong, f"{len(wrong)} bad answers:\n" + "\n".join(wrong[:40])
