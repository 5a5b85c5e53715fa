"""JSON lines between the daemon and a node agent, over any pair of byte streams.

Daemon -> agent:  {"id": 7, "op": "stage", "params": {...}}
Agent -> daemon:  {"id": 7, "event": "progress", "data": {...}}   (zero or more)
                  {"id": 7, "event": "result", "data": {...}}     (exactly one, ends the call)
                  {"id": 7, "event": "error", "message": "..."}   (instead of a result)
Agent -> daemon:  {"id": 0, "event": "log", "message": "..."}     (unsolicited, for the log)

One session per node carries many concurrent calls; ids pair replies with calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hpcstage.errors import AgentError, TransportError

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024 * 1024  # a single message; progress and results are far smaller
CLOSE_WAIT = 5.0  # seconds a failed send waits for the reader to say why the session ended

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


@dataclass
class _Call:
    future: asyncio.Future[dict[str, Any]]
    on_progress: ProgressFn | None


@dataclass
class RpcClient:
    """Calls over one agent session. ``closed`` is set when the session ends, for any reason."""

    reader: asyncio.StreamReader
    writer: Any  # asyncio.StreamWriter or asyncssh's writer: both have write()/drain()
    name: str
    _calls: dict[int, _Call] = field(default_factory=dict)
    _next: int = 1
    _pump: asyncio.Task[None] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""
    # Says why the agent ended when its output just stops (e.g. the remote shell's exit
    # status and last words): "session closed" alone tells an admin nothing.
    explain_eof: Callable[[], Awaitable[str]] | None = None

    def start(self) -> None:
        """Start reading replies in the background."""
        self._pump = asyncio.create_task(self._read_loop(), name=f"rpc-{self.name}")

    async def call(
        self, op: str, params: dict[str, Any], on_progress: ProgressFn | None = None
    ) -> dict[str, Any]:
        """Send one call and wait for its result; AgentError or TransportError on failure."""
        if self.closed.is_set():
            raise TransportError(f"agent on {self.name} is gone: {self.close_reason}")
        call_id, self._next = self._next, self._next + 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = _Call(future, on_progress)
        try:
            self.writer.write(encode({"id": call_id, "op": op, "params": params}))
            await self.writer.drain()
            return await future
        except (ConnectionError, BrokenPipeError, OSError) as exc:
            # The session just ended (e.g. the agent command failed at once): its reader
            # says why (exit status, last output) better than "channel not open".
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), CLOSE_WAIT)
            raise TransportError(f"agent on {self.name}: {self.close_reason or exc}") from exc
        finally:
            self._calls.pop(call_id, None)

    async def _read_loop(self) -> None:
        reason = "session closed"
        try:
            while line := await self.reader.readline():
                self._dispatch(decode(line))
            if self.explain_eof is not None:
                with contextlib.suppress(Exception):
                    if detail := await self.explain_eof():
                        reason = f"{reason} ({detail})"
        except (TransportError, ConnectionError, OSError, asyncio.LimitOverrunError) as exc:
            reason = str(exc)
        except asyncio.CancelledError:
            reason = "closed by the daemon"
        finally:
            self._fail_all(reason)

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

    def _fail_all(self, reason: str) -> None:
        self.close_reason = reason
        self.closed.set()
        for call in self._calls.values():
            if not call.future.done():
                call.future.set_exception(TransportError(f"agent on {self.name}: {reason}"))

    async def close(self) -> None:
        """Stop reading and fail calls still waiting."""
        with contextlib.suppress(Exception):
            self.writer.write_eof()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump


Handler = Callable[[dict[str, Any], ProgressFn], Awaitable[dict[str, Any]]]
