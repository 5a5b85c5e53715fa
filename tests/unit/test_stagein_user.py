"""Whose reading a shared path is checked as: a job's user, never nobody (docs/security.md).

The agent reads shared paths as the service account, so it checks each file as the job's user
first. Only an admin's kept-warm dataset (job key ``pin-<id>``) has no user and no check: its
view is the service account's alone. Any other staging with an empty user is refused, rather
than reading the path as the service account for whoever sent it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcstage.agent import stagein
from hpcstage.agent.context import NodeContext
from hpcstage.cache import NodeCache
from hpcstage.core.directives import SourceKind
from hpcstage.db import Job
from hpcstage.errors import HpcstageError
from hpcstage.protocol.messages import (
    NO_LIMITS,
    PIN_JOB_PREFIX,
    SourceSpec,
    StageItem,
    StageReply,
    StageRequest,
)
from hpcstage.staging.records import key_of


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[NodeContext]:
    cache = NodeCache(tmp_path / "cache")
    yield NodeContext("n1", cache)
    cache.close()


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    path = (tmp_path / "shared" / "set").resolve()
    path.mkdir(parents=True)
    (path / "a.txt").write_bytes(b"data")
    return path


def _stage(ctx: NodeContext, job: str, user: str, path: Path) -> StageReply:
    item = StageItem(
        request_id=1,
        source=SourceSpec(SourceKind.PATH, "", "", str(path), [], [], ""),
        dest="in",
        max_bytes=None,
        quota_reason="",
        max_objects=None,
        objects_reason="",
    )
    call = StageRequest(job, user, view=True, items=[item], rates=NO_LIMITS)
    return asyncio.run(stagein.stage(ctx, call, lambda _: None))


def test_a_job_with_no_user_is_refused_a_shared_path(ctx: NodeContext, shared: Path) -> None:
    with pytest.raises(HpcstageError) as caught:
        _stage(ctx, "123", "", shared)
    assert "no user" in str(caught.value) and str(shared) in str(caught.value)
    assert not (ctx.cache.jobs / "123" / "in" / "a.txt").exists()


def test_a_kept_warm_dataset_stages_a_shared_path_with_no_user(
    ctx: NodeContext, shared: Path
) -> None:
    reply = _stage(ctx, f"{PIN_JOB_PREFIX}5", "", shared)
    assert reply.items[0].files_done == 1 and not reply.acl
    assert (Path(reply.view) / "in" / "a.txt").read_bytes() == b"data"


def test_the_daemon_names_a_pin_job_as_the_agent_expects() -> None:
    assert key_of(Job(id=5, kind="pin")).startswith(PIN_JOB_PREFIX)
    assert not key_of(Job(id=5, kind="warmup")).startswith(PIN_JOB_PREFIX)
