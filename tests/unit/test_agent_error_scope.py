"""The agent tells the daemon whether a failed call is the node's fault or the data's
(agent/server.py NODE_ONLY): the daemon drops a node for the first, fails the job for the
second. Pure: the call's handler raises, the reply is read back as the daemon decodes it."""

from __future__ import annotations

import asyncio
import errno
import json
from typing import Any

import pytest

from hpcstage.agent.server import _handle
from hpcstage.errors import (
    CacheError,
    LimitError,
    ObjectMissingError,
    PackError,
    PermissionRefused,
    QuotaError,
)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.lines.append(json.loads(data))

    async def drain(self) -> None:
        return None


def _reply_to(exc: BaseException) -> dict[str, Any]:
    async def handler(params: dict[str, Any], progress: Any) -> dict[str, Any]:
        raise exc

    writer = _Writer()
    asyncio.run(_handle({"id": 3, "op": "stage"}, {"stage": handler}, writer))  # type: ignore[arg-type]
    (reply,) = writer.lines
    assert (reply["id"], reply["event"]) == (3, "error")
    return reply


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EIO, "Input/output error"),
        QuotaError("over the account's quota on this node"),
        RuntimeError("a bug"),
    ],
)
def test_failures_of_the_node_itself_are_marked_node_only(exc: BaseException) -> None:
    assert _reply_to(exc)["node_only"] is True


@pytest.mark.parametrize(
    "exc",
    [
        ObjectMissingError("s3://data/x: no such key"),
        PermissionRefused("bob may not read /shared/x"),
        PackError("segment 00000001-00000-000000.tar: CRC mismatch"),
        LimitError("too many objects"),
        CacheError("lig/a.sdf appears twice in the selection"),
    ],
)
def test_failures_of_the_data_are_not(exc: BaseException) -> None:
    assert _reply_to(exc)["node_only"] is False
