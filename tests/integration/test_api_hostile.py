"""The real daemon's API against malformed input: a 4xx naming the parameter, never a 500.

The same cases as tests/unit/test_api_hostile.py (tests/api_fuzz.py), drawn from the running
daemon's own /openapi.json and sent over HTTP as root (an admin, so that every route gets
past authentication), with the real database, Slurm, agents and S3 store behind them.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from devcluster.cluster import DevCluster
from hpcstage import auth
from tests import api_fuzz

from .staging import Stager, running_stager

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    # A short poll: /ensure of a job the daemon does not know waits 2.5 polls.
    yield from running_stager(cluster, "hostile-api", poll="200ms")


def _send(stager: Stager, case: api_fuzz.Case) -> tuple[int, bytes]:
    """(status, body) of one request; status 0 when the server dropped the connection."""
    where = urlsplit(stager.client.base_url)
    conn = http.client.HTTPConnection(where.hostname or "", where.port, timeout=30)
    headers = {"authorization": auth.header(stager.client.socket)}
    headers.update((name.lower(), value) for name, value in case.headers)  # replaces
    if case.body is not None:
        headers["content-type"] = "application/json"
    target = case.raw_path + (f"?{case.query}" if case.query else "")
    try:
        conn.request(case.method, target, body=case.body, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    except (OSError, http.client.HTTPException) as exc:
        return 0, repr(exc).encode()
    finally:
        conn.close()


def _schema(stager: Stager) -> dict[str, Any]:
    status, body = _send(stager, api_fuzz.Case("GET", "/openapi.json", "", (), None, ""))
    assert status == 200, body
    found: dict[str, Any] = json.loads(body)
    return found


def test_no_malformed_request_gets_a_500_from_the_real_daemon(stager: Stager) -> None:
    schema = _schema(stager)
    assert len(api_fuzz.routes(schema)) >= 12
    wrong = []
    for case in api_fuzz.cases(schema):
        status, body = _send(stager, case)
        if not 0 < status < 500 or not api_fuzz.names_param(status, body, case.param):
            wrong.append(f"{case.describe()} -> {status} {body[:300]!r}")
    assert not wrong, f"{len(wrong)} bad answers:\n" + "\n".join(wrong[:40])
    health = stager.client.get("/api/v1/health")  # and the daemon still serves
    assert health["version"]
