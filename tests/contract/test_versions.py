"""Pinned object versions (``s3://b/k?versionId=V``) and preserved mtimes, through the agent's
``stage`` call against moto's S3 server, which keeps versions (the dev cluster's rclone does
not): the older version is staged byte-exact, it and the current object are two cache
entries never served for each other, and the staged files carry the store's Last-Modified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import botocore.session
import pytest

from hpcstage.agent import calls, stagein
from hpcstage.agent.context import DEFAULT_CACHE, DEFAULT_TRANSFER, NodeContext
from hpcstage.cache import NodeCache
from hpcstage.core.directives import parse_value
from hpcstage.errors import StoreError
from hpcstage.protocol.messages import (
    NO_LIMITS,
    AgentStoreSettings,
    HelloRequest,
    SourceSpec,
    StageItem,
    StageRequest,
)
from hpcstage.store.protocol import MIB

from .conftest import S3Server

pytestmark = pytest.mark.anyio

VERSIONED = "versioned"


def _client(server: S3Server) -> Any:
    return botocore.session.Session().create_client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    )


@pytest.fixture(scope="module")
def versioned(moto_server: S3Server) -> Any:
    """A bucket with versioning on, and a botocore client to fill it."""
    s3 = _client(moto_server)
    s3.create_bucket(Bucket=VERSIONED)
    s3.put_bucket_versioning(Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})
    return s3


@pytest.fixture
async def agent(moto_server: S3Server, tmp_path: Path) -> AsyncIterator[NodeContext]:
    ctx = NodeContext(node="n1", cache=NodeCache(tmp_path / "cache"))
    store = AgentStoreSettings(
        endpoint_url=moto_server.endpoint,
        region="us-east-1",
        addressing_style="path",
        verify_tls=True,
        ca_bundle="",
        max_connections=16,
        connect_timeout=10.0,
        read_timeout=60.0,
        credentials={**moto_server.credentials(), "token": ""},
    )
    # Small parts: a 12 MiB object would be fetched in ranged parts if it were not pinned.
    transfer = dataclasses.replace(
        DEFAULT_TRANSFER, part_size=5 * MIB, multipart_threshold=5 * MIB, concurrency=4
    )
    await calls.hello(ctx, HelloRequest(store, transfer, DEFAULT_CACHE, None))
    try:
        yield ctx
    finally:
        await ctx.stores.close()
        ctx.cache.close()


async def _stage(ctx: NodeContext, job: str, directive: str) -> Path:
    """Stage one ``--stage-in`` value as the daemon would send it; the staged path."""
    parsed = parse_value("stage-in", directive)
    item = StageItem(1, SourceSpec.of(parsed.src.url), str(parsed.dest), None, "", None, "")
    await stagein.stage(ctx, StageRequest(job, "", True, [item], NO_LIMITS), lambda _: None)
    return ctx.cache.view_dir(job) / parsed.dest


def _put(s3: Any, key: str, body: bytes) -> tuple[str, float]:
    """Put a version; its id and Last-Modified (seconds)."""
    version = s3.put_object(Bucket=VERSIONED, Key=key, Body=body)["VersionId"]
    head = s3.head_object(Bucket=VERSIONED, Key=key, VersionId=version)
    return version, head["LastModified"].timestamp()


@pytest.mark.parametrize("size", [1000, 12 * MIB], ids=["small", "big"])
async def test_a_pinned_older_version_is_staged_byte_exact(
    versioned: Any, agent: NodeContext, size: int
) -> None:
    key = f"v-{uuid.uuid4().hex[:8]}/data.bin"
    old, new = os.urandom(size), os.urandom(size)  # same size: only the version tells them apart
    old_id, old_time = _put(versioned, key, old)
    new_id, new_time = _put(versioned, key, new)
    assert old_id != new_id

    pinned = await _stage(agent, "101", f"s3://{VERSIONED}/{key}?versionId={old_id}:in")
    current = await _stage(agent, "102", f"s3://{VERSIONED}/{key}:in")
    again = await _stage(agent, "103", f"s3://{VERSIONED}/{key}?versionId={old_id}:in")

    assert hashlib.sha256(pinned.read_bytes()).digest() == hashlib.sha256(old).digest()
    assert current.read_bytes() == new
    assert again.read_bytes() == old
    # Two cache entries: neither request was served the other's object.
    assert pinned.stat().st_ino == again.stat().st_ino != current.stat().st_ino
    # Each staged file carries its version's Last-Modified (S3's are whole seconds or ms).
    assert abs(pinned.stat().st_mtime - old_time) < 0.001
    assert abs(current.stat().st_mtime - new_time) < 0.001


async def test_a_version_that_does_not_exist_fails_naming_the_version(
    versioned: Any, agent: NodeContext
) -> None:
    key = f"v-{uuid.uuid4().hex[:8]}/data.bin"
    _put(versioned, key, b"only")
    # The cause names the version: the key exists, only that version of it does not.
    with pytest.raises(
        StoreError, match=re.escape(f"{key}?versionId=nosuchversion: no such version")
    ):
        await _stage(agent, "104", f"s3://{VERSIONED}/{key}?versionId=nosuchversion:in")


async def test_a_prefix_keeps_each_object_s_last_modified(
    versioned: Any, agent: NodeContext
) -> None:
    prefix = f"m-{uuid.uuid4().hex[:8]}/"
    times = {name: _put(versioned, prefix + name, os.urandom(100))[1] for name in ("a", "d/b")}
    staged = await _stage(agent, "105", f"s3://{VERSIONED}/{prefix}:in")
    for name, when in times.items():
        assert abs((staged / name).stat().st_mtime - when) < 0.001
