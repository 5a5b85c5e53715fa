"""The agent's stdio server: read calls, decode each into its message type, answer.

Every request is decoded strictly (``hpcstage.protocol.wire``) before its handler runs, so a
handler sees only typed fields; every reply and progress message is encoded the same way.
Each call runs in its own task; one failing call never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from hpcstage.agent import calls, direct, peer, stagein, uploader
from hpcstage.agent.context import NodeContext
from hpcstage.core.stageout import shown
from hpcstage.errors import (
    AccessError,
    CredentialError,
    FencedError,
    HpcstageError,
    ObjectChangedError,
    QuotaError,
    TransientStoreError,
)
from hpcstage.protocol import messages as m
from hpcstage.protocol.framing import (
    MAX_LINE,
    Handler,
    LineReader,
    Oversized,
    ProgressFn,
    call_id_of,
    decode,
    encode,
    too_long,
)
from hpcstage.protocol.wire import from_wire, to_wire

log = logging.getLogger("hpcstage.agent")

Req = TypeVar("Req")
Rep = TypeVar("Rep")
Send = Callable[[Any], None]  # sends one progress message (a dataclass of the call's kind)


@dataclass(frozen=True)
class Route(Generic[Req, Rep]):
    """One call: its message types and the handler that answers it (a framing ``Handler``)."""

    rpc: m.Rpc[Req, Rep]
    handler: Callable[[Req, Send], Awaitable[Rep]]

    async def __call__(self, params: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        request = from_wire(self.rpc.request, params)
        reply = await self.handler(request, lambda message: progress(to_wire(message)))
        return cast(dict[str, Any], to_wire(reply))


def _quiet(
    handler: Callable[[NodeContext, Req], Awaitable[Rep]], ctx: NodeContext
) -> Callable[[Req, Send], Awaitable[Rep]]:
    """A handler that sends no progress."""

    async def run(request: Req, _send: Send) -> Rep:
        return await handler(ctx, request)

    return run


def _reporting(
    handler: Callable[[NodeContext, Req, Send], Awaitable[Rep]], ctx: NodeContext
) -> Callable[[Req, Send], Awaitable[Rep]]:
    """A handler that sends progress while it runs."""

    async def run(request: Req, send: Send) -> Rep:
        return await handler(ctx, request, send)

    return run


def routes(ctx: NodeContext) -> dict[str, Handler]:
    """Every call the agent answers, by its name on the wire."""
    table: list[Route[Any, Any]] = [
        Route(m.HELLO, _quiet(calls.hello, ctx)),
        Route(m.CREDENTIALS, _quiet(calls.credentials, ctx)),
        Route(m.STAGE, _reporting(stagein.stage, ctx)),
        Route(m.STAGE_OUT, _reporting(uploader.stage_out, ctx)),
        Route(m.RELEASE, _quiet(calls.release, ctx)),
        Route(m.USAGE, _quiet(calls.usage, ctx)),
        Route(m.EVICT, _quiet(calls.evict, ctx)),
        Route(m.DROP_SOURCE, _quiet(calls.drop_source, ctx)),
        Route(m.PING, _quiet(calls.ping, ctx)),
        Route(m.RATES, _quiet(calls.rates, ctx)),
        Route(m.PEER_LIST, _quiet(peer.peer_list, ctx)),
        Route(m.PEER_WANT, _quiet(peer.peer_want, ctx)),
        Route(m.PEER_READ, _quiet(peer.peer_read, ctx)),
        Route(m.PEER_PUT, _quiet(peer.peer_put, ctx)),
        Route(m.PEER_SERVE, _quiet(direct.peer_serve, ctx)),
        Route(m.PEER_FETCH, _quiet(direct.peer_fetch, ctx)),
    ]
    return {route.rpc.op: route for route in table}


async def serve(ctx: NodeContext) -> None:
    """Answer calls from stdin until it closes; each call runs in its own task."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    handlers = routes(ctx)
    check = ctx.fence.check if ctx.fence is not None else None
    tasks: set[asyncio.Task[None]] = set()
    lines = LineReader(reader)
    while line := await lines.readline():
        if isinstance(line, Oversized):  # refuse that call; the session goes on
            refused = too_long("the request", line.size)
            _send(writer, {"id": call_id_of(line.head) or 0, "event": "error", "message": refused})
            continue
        task = asyncio.create_task(_handle(decode(line), handlers, writer, check))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ctx.stores.close()


async def _handle(
    message: dict[str, Any],
    handlers: dict[str, Handler],
    writer: asyncio.StreamWriter,
    check_fence: Callable[[], None] | None = None,
) -> None:
    """Answer one call; ``check_fence`` refuses it (FencedError) when a newer leader epoch
    than this agent's is recorded in the node cache."""
    call_id = message.get("id", 0)
    op = str(message.get("op"))

    def send(reply: dict[str, Any]) -> None:
        _send(writer, {"id": call_id, **reply}, op)

    def progress(data: dict[str, Any]) -> None:
        send({"event": "progress", "data": data})

    handler = handlers.get(str(message.get("op")))
    try:
        if handler is None:
            raise HpcstageError(f"unknown op {message.get('op')!r}")
        if check_fence is not None:
            await asyncio.to_thread(check_fence)
        send({"event": "result", "data": await handler(message.get("params", {}), progress)})
    except (HpcstageError, OSError) as exc:
        # Fenced: the staging is the newer daemon's now; a stale daemon must not fail it.
        transient = isinstance(exc, TransientStoreError | ObjectChangedError | FencedError)
        reply = {"event": "error", "message": _user_message(exc), "transient": transient}
        send({**reply, "node_only": isinstance(exc, NODE_ONLY)})
    except Exception as exc:  # never let one bad call kill the agent's other work
        log.exception("call %s failed", message.get("op"))
        text = shown(f"internal error: {type(exc).__name__}: {exc}")
        send({"event": "error", "message": text, "node_only": True})
    await writer.drain()


# Failures of the node itself (its filesystem, its room under the quotas, ACLs it cannot
# set): another node may succeed, so the daemon drops this node from a pending job's targets
# instead of failing the job. Everything else (missing or refused objects, corrupt datasets,
# a cache that refuses the data's shape) would fail on every node alike. A quota is the node
# account's unless the job's own limit set it: the daemon, which set it, tells them apart.
NODE_ONLY = (OSError, QuotaError, AccessError)


def _send(writer: asyncio.StreamWriter, message: dict[str, Any], op: str = "") -> None:
    """Write one message; one over the limit is not sent: a result becomes an error naming
    the limit (the daemon would drop it anyway), a progress report is left out."""
    line = encode(message)
    if len(line) <= MAX_LINE:
        writer.write(line)
        return
    what = too_long(f"the {message.get('event')} of {op}", len(line))
    log.error("%s; not sent", what)
    if message.get("event") == "result":
        writer.write(encode({"id": message.get("id", 0), "event": "error", "message": what}))


def _user_message(exc: BaseException) -> str:
    """One line for the daemon: printable and storable (a file name that is not UTF-8 in an
    OSError would otherwise fail the daemon's database write, and the staging would never end)."""
    if isinstance(exc, CredentialError):
        return shown(f"store refused the site credentials: {exc}")
    return shown(str(exc) or type(exc).__name__)
