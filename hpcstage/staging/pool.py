"""How the daemon reaches node agents: one session per node over SSH, or a local subprocess.

Nothing listens on compute nodes: the daemon logs in the way admins do and starts
``hpcstage agent`` there; JSON lines flow over the session's stdin/stdout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncssh

from hpcstage.core.fencing import Epoch
from hpcstage.errors import TransportError
from hpcstage.protocol.framing import MAX_LINE, RpcClient

log = logging.getLogger(__name__)
agent_log = logging.getLogger("hpcstage.agent")

STDERR_TAIL = 5  # last stderr lines of an agent kept to explain why its session ended
EXIT_WAIT = 2.0  # seconds to wait for a remote agent's exit status and last words
_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_AGENT_LINE = re.compile(rf"agent\[[^\]]*\] ({'|'.join(_LEVELS)}) (.*)")


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


async def open_local(node: str, argv: list[str], idle_timeout: float | None = None) -> LocalSession:
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
    rpc = RpcClient(process.stdout, process.stdin, node, idle_timeout=idle_timeout)
    rpc.start()
    return LocalSession(rpc, process)


@dataclass
class SshSession:
    """An agent started over SSH on a compute node."""

    rpc: RpcClient
    conn: asyncssh.SSHClientConnection
    process: Any
    stderr: asyncio.Task[None] | None = None

    async def close(self) -> None:
        await self.rpc.close()
        with contextlib.suppress(Exception):
            self.process.close()
        if self.stderr is not None:
            self.stderr.cancel()
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
    liveness: Liveness


@dataclass(frozen=True)
class Liveness:
    """How soon a silent node counts as lost (``nodes.keepalive_*``, ``nodes.rpc_idle_timeout``):
    SSH keepalives watch the link, the idle deadline the agent (framing.RpcClient)."""

    keepalive_interval: float
    keepalive_count_max: int
    rpc_idle_timeout: float


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
                keepalive_interval=target.liveness.keepalive_interval,
                keepalive_count_max=target.liveness.keepalive_count_max,
            ),
            target.connect_timeout,
        )
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        where = f"{target.user}@{target.host}:{target.port}"
        raise TransportError(f"cannot log in to {node} ({where}): {exc or 'timeout'}") from exc
    except ValueError as exc:  # asyncssh.KeyImportError: encrypted, or not a private key
        raise TransportError(
            f"cannot log in to {node}: the SSH key {target.key} cannot be used ({exc});"
            " nodes.ssh_key must be an unencrypted private key the service account can read"
        ) from exc
    try:
        process = await conn.create_process(target.command, encoding=None)
    except (OSError, asyncssh.Error) as exc:
        conn.close()
        raise TransportError(f"cannot start the agent on {node}: {exc}") from exc
    # The agent's log (and the remote shell's errors) arrive on stderr. Read it all the
    # time: it shares the channel's flow-control window with the replies on stdout.
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
    ended = asyncio.Event()  # stderr read to its end
    stderr = asyncio.create_task(
        _log_stderr(node, process.stderr, tail, ended), name=f"stderr-{node}"
    )

    async def explain() -> str:
        with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
            await asyncio.wait_for(process.wait_closed(), EXIT_WAIT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), EXIT_WAIT)
        said = []
        if process.exit_status is not None:
            said.append(f"exit status {process.exit_status}")
        elif process.exit_signal:
            said.append(f"killed by signal {process.exit_signal[0]}")
        if tail:
            said.append("last output: " + " | ".join(tail))
        return "; ".join(said)

    rpc = RpcClient(
        _SshBytes(process.stdout),
        process.stdin,
        node,
        idle_timeout=target.liveness.rpc_idle_timeout,
        explain_eof=explain,
    )
    rpc.start()
    return SshSession(rpc, conn, process, stderr)


async def _log_stderr(
    node: str, stream: Any, tail: collections.deque[str], ended: asyncio.Event
) -> None:
    """Log each stderr line of the agent on ``node`` at its own level (``agent_line``),
    keeping the last few for the session's close reason; set ``ended`` at the end of the
    stream."""
    with contextlib.suppress(asyncssh.Error, OSError):
        while raw := await stream.readline():
            text = raw.decode(errors="replace").rstrip()
            if not text:
                continue
            level, message = agent_line(text)
            agent_log.log(level, "agent on %s: %s", node, message)
            tail.append(text)
    ended.set()


def agent_line(text: str) -> tuple[int, str]:
    """Level and message of one stderr line of an agent: its text form (``agent[NODE] LEVEL
    message``) or its JSON form (``--log-format json``: the exception appended); anything else,
    such as a shell's "command not found" or a traceback, is a warning, as it is."""
    found = _AGENT_LINE.fullmatch(text)
    if found:
        return _LEVELS[found.group(1)], found.group(2)
    entry: object = None
    if text.startswith("{"):
        with contextlib.suppress(ValueError):
            entry = json.loads(text)
    if isinstance(entry, dict) and entry.get("level") in _LEVELS:
        message, exc = entry.get("message"), entry.get("exc")
        if isinstance(message, str):
            return _LEVELS[entry["level"]], message + (f"\n{exc}" if isinstance(exc, str) else "")
    return logging.WARNING, text


class _SshBytes:
    """asyncssh's reader as a ``ByteSource``, its errors as ConnectionError. Only ``read``:
    its ``readline`` returns part of a line longer than the channel's window (framing.py)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def read(self, n: int) -> bytes:
        try:
            data: bytes = await self._inner.read(n)
        except asyncssh.Error as exc:
            raise ConnectionError(str(exc)) from exc
        return data


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


def own_command() -> str:
    """The absolute path of the running ``hpcstage`` command, symlinks kept (an install
    prefix's bin/hpcstage stays valid across reinstalls; the venv behind it may not)."""
    argv0 = sys.argv[0]
    found = argv0 if os.sep in argv0 else shutil.which(argv0)
    if found and Path(found).name == "hpcstage":
        return os.path.abspath(found)
    return str(Path(sys.executable).parent / "hpcstage")  # python -m hpcstage


def agent_command(configured: str) -> str:
    """``nodes.agent_command``, or when it is "" this process's own ``hpcstage`` followed by
    ``agent``: with the software tree at the same path on the nodes (as modules need), the
    agent is the daemon's own version. An SSH command runs in a non-login shell, which does
    not load modules: a bare "hpcstage agent" works only if hpcstage is on its PATH."""
    return configured or shlex.join([own_command(), "agent"])


def agent_argv(command: str, node: str, cache_dir: str, epoch: Epoch | None = None) -> list[str]:
    """The agent command line for one node (``command`` is a shell-like string), with the
    daemon's leader epoch, which the agent claims before it waits for the cache's lock."""
    argv = [*shlex.split(command), "--node", node, "--cache-dir", cache_dir]
    if epoch is not None:
        argv += ["--epoch", str(epoch.number), "--state-id", epoch.state]
    return argv


def agent_shell_command(command: str, node: str, cache_dir: str, epoch: Epoch | None = None) -> str:
    """The same, quoted for a remote shell."""
    return shlex.join(agent_argv(command, node, cache_dir, epoch))
