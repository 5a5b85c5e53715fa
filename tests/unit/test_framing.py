"""The JSON-lines framing: whole lines of any size up to the limit, and a line over it
dropped to its end without losing the lines around it."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from hpcstage.agent.peer import PEER_MAX
from hpcstage.errors import ProtocolError, TransportError
from hpcstage.protocol.framing import (
    MAX_LINE,
    LineReader,
    Oversized,
    RpcClient,
    call_id_of,
    encode,
)
from hpcstage.staging.peer import BATCH_BYTES, PAGE


async def _lines(data: bytes, max_line: int, pieces: int = 7) -> list[bytes | Oversized]:
    """Every line LineReader finds in ``data``, fed in ``pieces`` uneven chunks."""
    stream = asyncio.StreamReader()
    step = max(1, len(data) // pieces)
    for at in range(0, len(data), step):
        stream.feed_data(data[at : at + step])
    stream.feed_eof()
    reader, found = LineReader(stream, max_line), []
    while line := await reader.readline():
        found.append(line)
    return found


def test_lines_come_whole_whatever_the_chunks() -> None:
    data = b'{"id":1}\n' + b"x" * 300_000 + b"\n" + b'{"id":2}\n'
    got = asyncio.run(_lines(data, max_line=1 << 20, pieces=50))
    assert got == [b'{"id":1}\n', b"x" * 300_000 + b"\n", b'{"id":2}\n']


def test_a_line_over_the_limit_is_dropped_and_the_next_is_whole() -> None:
    big = b'{"id":9,"event":"result","data":"' + b"y" * 500_000 + b'"}\n'
    got = asyncio.run(_lines(big + b'{"id":10}\n' + b"tail", max_line=100_000))
    assert len(got) == 3
    dropped = got[0]
    assert isinstance(dropped, Oversized) and dropped.size == len(big)
    assert call_id_of(dropped.head) == 9
    assert got[1:] == [b'{"id":10}\n', b"tail"]  # the last, unterminated line as it is


def test_a_line_just_over_the_limit_in_one_chunk_is_dropped_too() -> None:
    got = asyncio.run(_lines(b"z" * 101 + b"\n", max_line=100, pieces=1))
    assert got == [Oversized(b"z" * 101 + b"\n", 102)]
    assert call_id_of(b"zzz") is None


class _Writer:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    async def drain(self) -> None:
        return None


def test_a_request_over_the_limit_is_refused_before_it_is_sent() -> None:
    async def run() -> tuple[str, list[bytes]]:
        writer = _Writer()
        rpc = RpcClient(asyncio.StreamReader(), writer, "n1")
        with pytest.raises(ProtocolError) as caught:
            await rpc.call("peer_put", {"objects": ["a" * MAX_LINE]})
        return str(caught.value), writer.written

    text, written = asyncio.run(run())
    assert text.startswith("agent on n1: the peer_put call is ")
    assert text.endswith("over the limit of one message (16 MiB)")
    assert written == []


def test_the_biggest_peer_batch_fits_in_one_message() -> None:
    # Base64 of a full batch, plus fields for each of its rows (at most a page of them): an
    # S3 key of up to 1 KiB, the cache id, ETag and SHA-256: well under 1.5 KiB.
    assert PEER_MAX <= BATCH_BYTES  # one object alone never exceeds a batch
    assert BATCH_BYTES * 4 // 3 + PAGE * 1536 < MAX_LINE


class _Agent:
    """The far end of an RpcClient: sees each request; answers pings only if ``alive``."""

    def __init__(self, alive: bool) -> None:
        self.alive = alive
        self.replies = asyncio.StreamReader()
        self.ops: list[str] = []

    def write(self, data: bytes) -> None:
        request = json.loads(data)
        self.ops.append(request["op"])
        if self.alive and request["op"] == "ping":
            self.answer(request["id"], {"node": "n1"})

    def answer(self, call_id: int, data: dict[str, object]) -> None:
        self.replies.feed_data(encode({"id": call_id, "event": "result", "data": data}))

    async def drain(self) -> None:
        return None


def test_a_silent_agent_fails_the_waiting_call_after_the_idle_timeout() -> None:
    async def run() -> tuple[str, float, list[str], bool]:
        agent = _Agent(alive=False)
        rpc = RpcClient(agent.replies, agent, "n1", idle_timeout=0.4)
        rpc.start()
        start = time.monotonic()
        with pytest.raises(TransportError) as caught:
            await asyncio.wait_for(rpc.call("stage", {}), 5)
        took = time.monotonic() - start
        await rpc.close()
        return str(caught.value), took, agent.ops, rpc.closed.is_set()

    text, took, ops, closed = asyncio.run(run())
    assert 0.4 <= took < 1.5, took
    assert ops == ["stage", "ping"]  # asked once whether it is alive, after half the timeout
    assert closed
    assert re.match(r"agent on n1: no answer for 0\.[4-9] s with calls waiting", text), text
    assert text.endswith("(nodes.rpc_idle_timeout is 0.4 s): the node or its agent hangs")


def test_a_long_call_of_an_agent_that_answers_pings_is_never_cut_short() -> None:
    async def run() -> dict[str, object]:
        agent = _Agent(alive=True)
        rpc = RpcClient(agent.replies, agent, "n1", idle_timeout=0.3)
        rpc.start()
        asyncio.get_running_loop().call_later(1.5, agent.answer, 1, {"done": True})
        try:
            return await asyncio.wait_for(rpc.call("stage", {}), 5)  # five idle timeouts
        finally:
            await rpc.close()

    assert asyncio.run(run()) == {"done": True}
