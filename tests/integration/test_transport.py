"""The SSH transport against the dev cluster's real sshd: what an agent says on stderr is
logged and explains a session that ends, a chatty agent cannot stall its replies, and a key
that cannot be used is a clear error."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from devcluster.cluster import DevCluster
from hpcstage.errors import ProtocolError, TransportError
from hpcstage.protocol.framing import MAX_LINE
from hpcstage.staging.pool import Liveness, SshTarget, open_ssh

pytestmark = pytest.mark.integration

RESULT = '{"id":1,"event":"result","data":{"ok":true}}'


def target(cluster: DevCluster, command: str, key: str | None = None) -> SshTarget:
    info = cluster.info
    return SshTarget(
        host="127.0.0.1",
        port=info.sshd_port,
        user="hpcstage",
        key=key or info.ssh_key,
        known_hosts=info.known_hosts,
        command=command,
        connect_timeout=10,
        liveness=Liveness(keepalive_interval=15, keepalive_count_max=4, rpc_idle_timeout=60),
    )


async def call_once(
    where: SshTarget, timeout: float = 30, then: Callable[[], bool] | None = None
) -> Any:
    """One call to the "agent" at ``where``; with ``then``, the session stays open until
    ``then()`` holds (at most ``timeout`` s): stderr is read alongside the replies."""
    session = await open_ssh("n1", where)
    try:
        result = await asyncio.wait_for(session.rpc.call("ping", {}), timeout)
        deadline = time.monotonic() + timeout
        while then is not None and not then() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return result
    finally:
        await session.close()


def test_an_agent_command_that_is_not_there_says_so(cluster: DevCluster) -> None:
    where = target(cluster, "/nonexistent/bin/hpcstage agent --node n1 --cache-dir /tmp/x")
    with pytest.raises(TransportError) as caught:
        asyncio.run(call_once(where))
    text = str(caught.value)
    assert text.startswith("agent on n1: session closed (exit status 127; last output: ")
    assert "/nonexistent/bin/hpcstage" in text


def test_the_agents_stderr_is_logged_at_its_level_and_never_stalls_replies(
    cluster: DevCluster, caplog: pytest.LogCaptureFixture
) -> None:
    # 4 MB on stderr before the reply: more than the channel's window (2 MiB), which stdout
    # and stderr share, so the reply arrives only if stderr is read meanwhile.
    command = (
        "echo 'agent[n1] INFO cache reconciled' >&2; "
        """echo '{"level": "WARNING", "logger": "hpcstage.agent", "message": "in json"}' >&2; """
        "head -c 4000000 /dev/zero | tr '\\0' x | fold -w 2000 >&2; echo >&2; "
        "echo 'agent[n1] ERROR something broke' >&2; "
        f"echo '{RESULT}'; sleep 30"
    )

    def records() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "hpcstage.agent"]

    def all_logged() -> bool:
        return (logging.ERROR, "agent on n1: something broke") in records()

    with caplog.at_level(logging.INFO, logger="hpcstage.agent"):
        assert asyncio.run(call_once(target(cluster, command), then=all_logged)) == {"ok": True}
    logged = records()
    assert (logging.INFO, "agent on n1: cache reconciled") in logged
    assert (logging.WARNING, "agent on n1: in json") in logged  # an agent's --log-format json
    assert (logging.ERROR, "agent on n1: something broke") in logged
    flood = [level for level, m in logged if m.startswith("agent on n1: xxxx")]
    assert len(flood) == 2000 and set(flood) == {logging.WARNING}  # not the agent's format


def test_an_encrypted_key_is_a_clear_error(cluster: DevCluster, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    private = asyncssh.generate_private_key("ssh-ed25519")
    private.write_private_key(str(key), format_name="pkcs8-pem", passphrase="secret")
    with pytest.raises(TransportError) as caught:
        asyncio.run(call_once(target(cluster, "true", key=str(key))))
    text = str(caught.value)
    assert text.startswith(f"cannot log in to n1: the SSH key {key} cannot be used (")
    assert "must be an unencrypted private key" in text


def _reply_of(size: int, call_id: int = 1) -> str:
    """Shell that waits for one request, then answers call ``call_id`` with a result that
    is one JSON line of about ``size`` bytes."""
    return (
        f'read -r _; printf \'{{"id":{call_id},"event":"result","data":{{"blob":"\';'
        f" head -c {size} /dev/zero | tr '\\0' x; printf '\"}}}}\\n'"
    )


def test_a_reply_bigger_than_the_ssh_window_arrives_whole(cluster: DevCluster) -> None:
    """Issue 18: asyncssh's readline returns a partial line when a line outgrows the
    channel's receive window (2 MiB), so a peer_read of 4 MiB of objects (5.4 MiB of base64)
    read as "not JSON", the session died and every object came from the store again."""
    size = 6 * 1024 * 1024
    command = f"{_reply_of(size)}; sleep 30"
    result = asyncio.run(call_once(target(cluster, command), timeout=60))
    assert result == {"blob": "x" * size}


def test_a_reply_over_the_message_limit_fails_that_call_and_not_the_session(
    cluster: DevCluster,
) -> None:
    """A line longer than MAX_LINE is read to its end and dropped: the call it answers fails
    with a clear error naming the limit, and the next call on the session still works."""
    command = f"{_reply_of(MAX_LINE + 1024)}; read -r _; echo '{RESULT.replace('1', '2', 1)}'"

    async def two_calls() -> Any:
        session = await open_ssh("n1", target(cluster, command + "; sleep 30"))
        try:
            with pytest.raises(ProtocolError) as caught:
                await asyncio.wait_for(session.rpc.call("peer_read", {}), 60)
            assert not session.rpc.closed.is_set()
            return str(caught.value), await asyncio.wait_for(session.rpc.call("ping", {}), 30)
        finally:
            await session.close()

    text, second = asyncio.run(two_calls())
    assert text.startswith("agent on n1: the reply to peer_read is ")
    assert "over the limit of one message (16 MiB)" in text
    assert second == {"ok": True}


def test_a_frozen_ssh_connection_is_lost_after_its_keepalives(cluster: DevCluster) -> None:
    """With nothing on the link (the node's sshd stopped, as a crashed node or a cut network
    looks), keepalives end the connection and the waiting call fails, with no RPC deadline."""
    shared = Path(tempfile.mkdtemp(dir=cluster.info.base))  # the service account writes here
    shared.chmod(0o777)
    said = shared / "sshd.pid"
    command = f"echo $PPID > {said}; read -r _; sleep 120"
    where = target(cluster, command)
    where = SshTarget(**{**where.__dict__, "liveness": Liveness(1, 2, rpc_idle_timeout=0)})

    async def frozen() -> tuple[str, float]:
        session = await open_ssh("n1", where)
        try:
            deadline = time.monotonic() + 30
            while not said.exists() or not said.read_text().strip():
                assert time.monotonic() < deadline, "the remote shell never wrote its $PPID"
                await asyncio.sleep(0.05)
            sshd = int(said.read_text())
            os.kill(sshd, signal.SIGSTOP)
            try:
                start = time.monotonic()
                with pytest.raises(TransportError) as caught:
                    await asyncio.wait_for(session.rpc.call("ping", {}), 30)
                return str(caught.value), time.monotonic() - start
            finally:
                os.kill(sshd, signal.SIGCONT)
        finally:
            await session.close()

    text, took = asyncio.run(frozen())
    assert took < 1 * (2 + 1) + 3, took
    assert text.startswith("agent on n1: "), text
    assert "keepalive" in text.lower(), text
