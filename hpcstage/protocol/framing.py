"""JSON lines between the daemon and a node agent, over any pair of byte streams.

Daemon -> agent:  {"id": 7, "op": "stage", "params": {...}}
Agent -> daemon:  {"id": 7, "event": "progress", "data": {...}}   (zero or more)
                  {"id": 7, "event": "result", "data": {...}}     (exactly one, ends the call)
                  {"id": 7, "event": "error", "message": "..."}   (instead of a result)
Agent -> daemon:  {"id": 0, "event": "log", "message": "..."}     (unsolicited, for the log)

One session per node carries many concurrent calls; ids pair replies with calls.

A message is at most ``MAX_LINE`` bytes. A sender refuses to send a longer one (the call fails
with a ProtocolError naming the limit); a receiver reads a longer one to its end, drops it and
fails only the call it belongs to: one oversized reply never ends the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from hpcstage.errors import AgentError, ProtocolError, TransportError

log = logging.getLogger(__name__)

# One message. The biggest on purpose is a peer_read reply or peer_put request: 4 MiB of
# objects (staging/peer.py: BATCH_BYTES), 5.4 MiB as base64.
MAX_LINE: Final = 16 * 1024 * 1024
MAX_LINE_SHOWN: Final = "16 MiB"
CHUNK: Final = 64 * 1024  # bytes read at a time
CLOSE_WAIT = 5.0  # seconds a failed send waits for the reader to say why the session ended
_HEAD: Final = 200  # bytes of an oversized line kept: its id, and something to log
_ID: Final = re.compile(rb'\{"id":(\d+),')

ProgressFn = Callable[[dict[str, Any]], None]


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line of compact JSON."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line; TransportError if it is not a JSON object (e.g. a shell banner)."""
    try:
        message = json.loads(line)
    except ValueError as exc:
        text = line[:200].decode(errors="replace").strip()
        raise TransportError(f"agent sent something that is not JSON: {text!r}") from exc
    if not isinstance(message, dict):
        raise TransportError(f"agent sent a JSON {type(message).__name__}, not an object")
    return message


def call_id_of(head: bytes) -> int | None:
    """The id an (oversized, unparsed) message starts with, as ``encode`` writes it."""
    found = _ID.match(head)
    return int(found.group(1)) if found else None


class ByteSource(Protocol):
    """What lines are read from: asyncio's StreamReader, or asyncssh's reader (whose errors
    the session translates)."""

    async def read(self, n: int) -> bytes: ...


@dataclass(frozen=True)
class Oversized:
    """A line over the limit, read to its end and dropped: its first bytes and its size."""

    head: bytes
    size: int


class LineReader:
    """Whole lines of at most ``max_line`` bytes from a byte stream.

    Not ``readline`` of the stream itself: asyncssh's returns a *partial* line once a line
    outgrows the channel's receive window (2 MiB), and asyncio's raises on a long line and
    leaves the stream mid-line; either way the session was lost (issue 18). Here a line over
    the limit is read to its end and handed back as ``Oversized``, and the next line is whole.
    """

    def __init__(self, source: ByteSource, max_line: int = MAX_LINE) -> None:
        self._source = source
        self._max = max_line
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline

    async def readline(self) -> bytes | Oversized:
        """The next line with its newline; at the end of the stream, what is left (b"" if
        nothing)."""
        head, dropped = b"", 0
        while (end := self._buf.find(b"\n", self._scanned)) < 0:
            if len(self._buf) > self._max:  # too long already: keep its head, drop the rest
                head = head or bytes(self._buf[:_HEAD])
                dropped += len(self._buf)
                self._buf.clear()
            self._scanned = len(self._buf)
            chunk = await self._source.read(CHUNK)
            if not chunk:
                line, self._buf, self._scanned = bytes(self._buf), bytearray(), 0
                return Oversized(head, dropped + len(line)) if dropped else line
            self._buf += chunk
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        self._scanned = 0
        if dropped or len(line) > self._max:
            return Oversized(head or line[:_HEAD], dropped + len(line))
        return line


def too_long(what: str, size: int) -> str:
    """The error for a message over the limit."""
    return f"{what} is {size} bytes, over the limit of one message ({MAX_LINE_SHOWN})"


@dataclass
class _Call:
    op: str
    future: asyncio.Future[dict[str, Any]]
    on_progress: ProgressFn | None


@dataclass
class RpcClient:
    """Calls over one agent session. ``closed`` is set when the session ends, for any reason.

    With ``idle_timeout``, a session that says nothing for that long while calls wait for it
    is taken for hung and ended (its calls fail with TransportError, as for a lost node).

    Why an idle deadline and not one per call: a stage of a big dataset rightly takes minutes
    or hours, and a single big object may download for minutes with no progress event, so any
    total deadline would either kill real work or be too long to notice a hung node. What
    tells a hung node (or a stopped agent) from a busy one is whether its agent still answers:
    after half the timeout of silence the client sends a ``ping``, which the agent's event
    loop answers at once however long its other calls run; no byte at all for the whole
    timeout means nobody is there. SSH keepalives (``open_ssh``) watch the link itself, also
    when no call waits.
    """

    reader: ByteSource
    writer: Any  # asyncio.StreamWriter or asyncssh's writer: both have write()/drain()
    name: str
    idle_timeout: float | None = None
    _calls: dict[int, _Call] = field(default_factory=dict)
    _next: int = 1
    _pump: asyncio.Task[None] | None = None
    _watch: asyncio.Task[None] | None = None
    _heard: float = field(default_factory=time.monotonic)  # last byte, or first call waiting
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""
    # Says why the agent ended when its output just stops (e.g. the remote shell's exit
    # status and last words): "session closed" alone tells an admin nothing.
    explain_eof: Callable[[], Awaitable[str]] | None = None

    def start(self) -> None:
        """Start reading replies (and watching for a hung agent) in the background."""
        self._pump = asyncio.create_task(self._read_loop(), name=f"rpc-{self.name}")
        if self.idle_timeout:
            self._watch = asyncio.create_task(
                self._watchdog(self.idle_timeout), name=f"rpc-watch-{self.name}"
            )

    async def call(
        self, op: str, params: dict[str, Any], on_progress: ProgressFn | None = None
    ) -> dict[str, Any]:
        """Send one call and wait for its result; AgentError or TransportError on failure."""
        if self.closed.is_set():
            raise TransportError(f"agent on {self.name} is gone: {self.close_reason}")
        call_id, self._next = self._next, self._next + 1
        line = encode({"id": call_id, "op": op, "params": params})
        if len(line) > MAX_LINE:
            raise ProtocolError(f"agent on {self.name}: {too_long(f'the {op} call', len(line))}")
        if not self._calls:  # the silence that counts starts now, not at the last reply
            self._heard = time.monotonic()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = _Call(op, future, on_progress)
        try:
            self.writer.write(line)
            await self._drained(future)
            return await future
        except (ConnectionError, BrokenPipeError, OSError) as exc:
            # The session just ended (e.g. the agent command failed at once): its reader
            # says why (exit status, last output) better than "channel not open".
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), CLOSE_WAIT)
            raise TransportError(f"agent on {self.name}: {self.close_reason or exc}") from exc
        finally:
            self._calls.pop(call_id, None)

    async def _drained(self, future: asyncio.Future[dict[str, Any]]) -> None:
        """Wait until the call is sent, or until it is answered or failed (a hung agent
        stops reading: its flow-control window fills and drain() would never return)."""
        drain = asyncio.ensure_future(self.writer.drain())
        try:
            await asyncio.wait((drain, future), return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.cancel()
        if drain.done() and not drain.cancelled():
            drain.result()

    async def _read_loop(self) -> None:
        reason = "session closed"
        lines = LineReader(self.reader)
        try:
            while line := await lines.readline():
                self._heard = time.monotonic()
                if isinstance(line, Oversized):
                    self._refuse(line)
                else:
                    self._dispatch(decode(line))
            if self.explain_eof is not None:
                with contextlib.suppress(Exception):
                    if detail := await self.explain_eof():
                        reason = f"{reason} ({detail})"
        except (TransportError, ConnectionError, OSError) as exc:
            reason = str(exc)
        except asyncio.CancelledError:
            reason = "closed by the daemon"
        finally:
            self._fail_all(reason)

    def _refuse(self, line: Oversized) -> None:
        """Fail the call an oversized reply answers; the session goes on."""
        call = self._calls.get(call_id_of(line.head) or 0)
        if call is None:
            text = line.head[:80].decode(errors="replace")
            log.error("agent on %s: %s; dropped", self.name, too_long(f"{text!r}...", line.size))
        elif not call.future.done():
            what = too_long(f"the reply to {call.op}", line.size)
            call.future.set_exception(ProtocolError(f"agent on {self.name}: {what}"))

    def _dispatch(self, message: dict[str, Any]) -> None:
        call = self._calls.get(int(message.get("id", 0)))
        event = message.get("event")
        if call is None or call.future.done():
            if event == "log":
                log.info("agent %s: %s", self.name, message.get("message", ""))
            return
        if event == "progress" and call.on_progress is not None:
            call.on_progress(message.get("data", {}))
        elif event == "result":
            call.future.set_result(message.get("data", {}))
        elif event == "error":
            text = str(message.get("message", "agent error"))
            transient, node_only = bool(message.get("transient")), bool(message.get("node_only"))
            call.future.set_exception(AgentError(text, transient, node_only))

    async def _watchdog(self, idle: float) -> None:
        """End the session once it is silent for ``idle`` seconds while calls wait; ask the
        agent for a ping after half of that (see the class's docstring)."""
        probe: asyncio.Task[Any] | None = None
        step = idle / 8
        try:
            while not self.closed.is_set():
                planned = time.monotonic() + step
                await asyncio.sleep(step)
                if (late := time.monotonic() - planned) > step:
                    # The daemon's own event loop stalled; replies may be waiting unread in
                    # the socket: that time is not the agent's silence.
                    self._heard += late
                quiet = time.monotonic() - self._heard
                if not self._calls:
                    continue
                if quiet >= idle:
                    self._fail_all(
                        f"no answer for {quiet:.1f} s with calls waiting"
                        f" (nodes.rpc_idle_timeout is {idle:g} s): the node or its agent hangs"
                    )
                    return
                if quiet >= idle / 2 and (probe is None or probe.done()):
                    probe = asyncio.create_task(self._ping())
        finally:
            if probe is not None:
                probe.cancel()

    async def _ping(self) -> None:
        with contextlib.suppress(AgentError, TransportError):
            await self.call("ping", {})

    def _fail_all(self, reason: str) -> None:
        if self.closed.is_set():
            return  # the first reason is the one that counts
        self.close_reason = reason
        self.closed.set()
        for call in self._calls.values():
            if not call.future.done():
                call.future.set_exception(TransportError(f"agent on {self.name}: {reason}"))

    async def close(self) -> None:
        """Stop reading and fail calls still waiting."""
        with contextlib.suppress(Exception):
            self.writer.write_eof()
        for task in (self._watch, self._pump):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


Handler = Callable[[dict[str, Any], ProgressFn], Awaitable[dict[str, Any]]]
