"""How the daemon reaches node agents: one session per node over SSH, or a local subprocess.

Nothing listens on compute nodes: the daemon logs in the way admins do and starts
``hpcstage agent`` there; JSON lines flow over the session's stdin/stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncssh

from hpcstage.errors import TransportError
from hpcstage.transfer.rpc import MAX_LINE, RpcClient

log = logging.getLogger(__name__)


class AgentSession(Protocol):
    """A live agent on one node."""

    rpc: RpcClient

    async def close(self) -> None: ...


@dataclass
class LocalSession:
    """An agent started as a child process of the daemon (single-host sites, tests)."""

    rpc: RpcClient
    process: asyncio.subprocess.Process

    async def close(self) -> None:
        await self.rpc.close()
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def open_local(node: str, argv: list[str]) -> LocalSession:
    """Start ``argv`` (an ``hpcstage agent`` command line) and speak JSON lines to it."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # the agent's log goes to the daemon's stderr
            limit=MAX_LINE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except OSError as exc:
        raise TransportError(f"cannot start the agent for {node} ({argv[0]}): {exc}") from exc
    assert process.stdout is not None
    assert process.stdin is not None
    rpc = RpcClient(process.stdout, process.stdin, node)
    rpc.start()
    return LocalSession(rpc, process)


@dataclass
class SshSession:
    """An agent started over SSH on a compute node."""

    rpc: RpcClient
    conn: asyncssh.SSHClientConnection
    process: Any

    async def close(self) -> None:
        await self.rpc.close()
        with contextlib.suppress(Exception):
            self.process.close()
        self.conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conn.wait_closed(), 10)


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom to log in, and which agent command to run there."""

    host: str
    port: int
    user: str
    key: str
    known_hosts: str
    command: str
    connect_timeout: float


async def open_ssh(node: str, target: SshTarget) -> SshSession:
    """Log in to ``node`` and start the agent; TransportError with the reason on failure."""
    known: Any = target.known_hosts or ()
    try:
        conn = await asyncio.wait_for(
            asyncssh.connect(
                target.host,
                port=target.port,
                username=target.user,
                client_keys=[os.path.expanduser(target.key)],
                known_hosts=os.path.expanduser(known) if isinstance(known, str) else known,
                agent_path=None,
            ),
            target.connect_timeout,
        )
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        where = f"{target.user}@{target.host}:{target.port}"
        raise TransportError(f"cannot log in to {node} ({where}): {exc or 'timeout'}") from exc
    process = await conn.create_process(target.command, encoding=None)
    stdout = process.stdout
    rpc = RpcClient(_StreamAdapter(stdout), process.stdin, node)
    rpc.start()
    return SshSession(rpc, conn, process)


class _StreamAdapter(asyncio.StreamReader):
    """Give asyncssh's reader the ``readline`` that RpcClient expects, with our line limit."""

    def __init__(self, inner: Any) -> None:
        super().__init__(limit=MAX_LINE)
        self._inner = inner

    async def readline(self) -> bytes:
        try:
            line: bytes = await self._inner.readline()
        except asyncssh.Error as exc:
            raise ConnectionError(str(exc)) from exc
        return line


Opener = Callable[[str], Awaitable[AgentSession]]


class AgentPool:
    """One session per node, opened on first use and reopened after it dies."""

    def __init__(self, opener: Opener, on_open: Callable[[str, RpcClient], Awaitable[None]]):
        self._opener = opener
        self._on_open = on_open
        self._sessions: dict[str, AgentSession] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, node: str) -> RpcClient:
        """The live RPC client for ``node``, (re)connecting and sending hello if needed."""
        lock = self._locks.setdefault(node, asyncio.Lock())
        async with lock:
            session = self._sessions.get(node)
            if session is not None and not session.rpc.closed.is_set():
                return session.rpc
            if session is not None:
                log.warning("agent on %s died (%s); reconnecting", node, session.rpc.close_reason)
                await session.close()
            session = await self._opener(node)
            try:
                await self._on_open(node, session.rpc)
            except BaseException:
                await session.close()
                raise
            self._sessions[node] = session
            return session.rpc

    def open_nodes(self) -> list[str]:
        """Nodes with a live session."""
        return [n for n, s in self._sessions.items() if not s.rpc.closed.is_set()]

    async def close(self) -> None:
        """Close every session."""
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


def agent_argv(command: str, node: str, cache_dir: str) -> list[str]:
    """The agent command line for one node (``command`` is a shell-like string)."""
    return [*shlex.split(command), "--node", node, "--cache-dir", cache_dir]


def agent_shell_command(command: str, node: str, cache_dir: str) -> str:
    """The same, quoted for a remote shell."""
    return shlex.join(agent_argv(command, node, cache_dir))
