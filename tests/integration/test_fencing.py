"""A new leader fences the dead leader's agents (issue 18, item 5: liveness, HA).

Two daemons share one PostgreSQL state database. The active one's host dies in the middle of a
stage-in: its daemon is killed (SIGKILL) and its network falls silent at the same moment, so
the agents it started over SSH are orphaned on their half-open sessions and keep fetching and
committing. The standby takes over with a higher leader epoch; its agent claims the node cache
with it, the orphaned agent stops writing and exits, and the new agent finishes the stage.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import proc
from devcluster.cluster import DevCluster
from devcluster.site import start_daemon, stop_daemon, write_site_config

from .staging import CHECKSUM_JOB, Stager, busy, parse_sums, scratch_database, wait_until

pytestmark = pytest.mark.integration

COUNT, SIZE = 32, 32 << 20  # 1 GiB in 32 MiB objects
# What the first daemon's agents get from the store, all together: slow enough that the
# orphaned agent is certainly still writing when the new epoch lands, on any machine.
ORPHAN_RATE = 6 << 20  # bytes a second
NODE = "n3"


class Relay:
    """A TCP relay on 127.0.0.1 to ``port``, carrying one daemon's connections only.

    ``freeze()`` relays nothing more, either way, and closes nothing: to the far side the
    near side's host fell silent (no FIN, no RST), as when it loses power. ``rate``: bytes a
    second from the far side, for all connections together (0: no limit)."""

    def __init__(self, port: int, rate: int = 0) -> None:
        self._listen = socket.create_server(("127.0.0.1", 0))
        self.port = self._listen.getsockname()[1]
        self._target = port
        self._rate = rate
        self._frozen = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._next = time.monotonic()  # when the next byte from the far side may pass
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._frozen.set()

    def close(self) -> None:
        self._listen.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listen.accept()
                far = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                return
            self._sockets += [near, far]
            for src, dst, limited in ((near, far, False), (far, near, True)):
                pump = threading.Thread(target=self._pump, args=(src, dst, limited), daemon=True)
                pump.start()

    def _pump(self, src: socket.socket, dst: socket.socket, limited: bool) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
                if self._frozen.is_set():
                    return  # nothing more arrives from a dead host, not even its FIN
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if limited and self._rate:
                    self._throttle(len(data))
                dst.sendall(data)
            except OSError:
                return

    def _throttle(self, size: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + size / self._rate
            wait = self._next - now
        time.sleep(wait)


@pytest.fixture
def state_url(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, "fencing") as url:
        yield url


def test_a_standby_fences_the_dead_leaders_agents_and_finishes_the_stage(
    cluster: DevCluster, state_url: str
) -> None:
    dev, info = cluster, cluster.info
    s3_port = int(info.s3_endpoint.rsplit(":", 1)[1])
    ssh, s3 = Relay(info.sshd_port), Relay(s3_port, rate=ORPHAN_RATE)
    first_config, second_config = _configs(dev, state_url, ssh, s3)
    stager = Stager(dev, first_config, "daemon-fencing-1.log")
    second_log = Path(info.base) / "log" / f"daemon-fencing-2-{uuid.uuid4().hex[:6]}.log"
    cache = info.node_cache(NODE)
    second = orphan = 0
    try:
        stager.start()
        second = start_daemon(dev, second_config, second_log.name)
        wait_until(
            "the second daemon to stand by",
            lambda: "standing by: another hpcstage daemon is active" in second_log.read_text(),
            90,
            second_log,
        )
        src, sums = _noise(dev)
        earlier = {path.name for path in (cache / "objects").glob("*/*")}  # other tests'
        hold = busy(stager, NODE, 1800, limit_min=30)  # the job stays pending while staged
        dest = src.rstrip("/").rsplit("/", 1)[1]
        job = stager.submit("alice", CHECKSUM_JOB.format(src=src, dest=dest), f"--nodelist={NODE}")
        stager.wait_doc(
            job, "part of the stage-in done", lambda d: _files_done(d) >= 3, timeout=300
        )
        (orphan,) = _agent_pids(dev, epoch=1)
        first_epoch = json.loads((cache / "epoch").read_text())
        assert first_epoch["epoch"] == 1, first_epoch

        # The first daemon's host dies: its network falls silent and its daemon is killed.
        ssh.freeze()
        os.kill(stager.pid, signal.SIGKILL)
        wait_until("the first daemon to be gone", lambda: not proc.alive(stager.pid), 30, None)
        stager.pid = 0
        watch = _CommitWatch(cache / "objects")
        watch.start()
        try:
            wait_until(
                "the standby to take over",
                lambda: "active: this daemon holds" in second_log.read_text(),
                180,
                second_log,
            )
            stager.pid, second = second, 0
            assert proc.alive(orphan), "the orphaned agent should still run (and write)"
            recorded = _wait_epoch(cache, first_epoch["state"], 2, second_log)
            epoch_at = (cache / "epoch").stat().st_ctime
            wait_until("the orphaned agent to exit", lambda: not proc.alive(orphan), 30, None)
            lock_at = _wait_new_lock_holder(cache, orphan, second_log)
        finally:
            watch.stop()
        assert str(recorded["holder"]).endswith(f"(agent for {NODE})")

        # No object was committed (nor linked) by the orphaned agent once the new epoch was
        # recorded: every change to an object before the new agent held the cache's lock is
        # older than the record. And the epoch landed in the middle of the stage.
        seen = {name: t for name, t in watch.first_seen.items() if name not in earlier}
        late = {name: t for name, t in seen.items() if epoch_at < t < lock_at - 0.05}
        assert not late, f"committed after epoch 2 was recorded at {epoch_at}: {late}"
        before = [name for name, t in seen.items() if t <= epoch_at]
        assert 0 < len(before) < COUNT, (len(before), "the new epoch should land mid-stage")

        # The new leader's agent finishes the stage, and the job reads every byte right.
        stager.wait_doc(
            job, "staged by the new leader", lambda d: d["staging"].get(NODE) == "ready", 600
        )
        proc.run(["scancel", str(hold)], env=dev.client_env())
        assert dev.wait_job(job, timeout=600) == "COMPLETED", stager.output("alice", job)
        assert parse_sums(stager.output("alice", job)) == sums
        said = second_log.read_text()
        assert "leader epoch 2" in said, said[-3000:]
    finally:
        stager.cancel_all()
        stager.stop()
        if second:
            stop_daemon(second)
        for pid in _agent_pids(dev, epoch=1):  # only if the test failed before it exited
            proc.stop_pid(pid)
        ssh.close()
        s3.close()


def _configs(dev: DevCluster, state_url: str, ssh: Relay, s3: Relay) -> tuple[Path, Path]:
    """The two daemons' site files: the same but for how the first reaches sshd and S3."""
    info = dev.info
    second = write_site_config(dev, name="fencing-2.toml", state_url=state_url, concurrency=4)
    text = second.read_text()
    known = Path(info.base) / "etc" / "fencing-known_hosts"
    known.write_text(
        Path(info.known_hosts).read_text().replace(f"]:{info.sshd_port} ", f"]:{ssh.port} ")
    )
    known.chmod(0o644)
    assert f"]:{ssh.port} " in known.read_text(), "sshd's host key, for the relay's port"
    first = second.with_name("fencing-1.toml")
    s3_endpoint = info.s3_endpoint.rsplit(":", 1)[0] + f":{s3.port}"
    edits = {
        f"ssh_port = {info.sshd_port}\n": f"ssh_port = {ssh.port}\n",
        f'ssh_known_hosts = "{info.known_hosts}"\n': f'ssh_known_hosts = "{known}"\n',
        f'endpoint_url = "{info.s3_endpoint}"\n': f'endpoint_url = "{s3_endpoint}"\n',
    }
    for old, new in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    first.write_text(text)
    first.chmod(0o644)
    return first, second


def _noise(dev: DevCluster) -> tuple[str, dict[str, str]]:
    """COUNT objects of SIZE bytes of noise (each distinct) and their SHA-256 by name."""
    name = f"fence-{uuid.uuid4().hex[:8]}"
    chunk = os.urandom(SIZE)
    bodies = {f"part{i:03d}.bin": chunk[i:] + chunk[:i] for i in range(COUNT)}

    async def upload() -> None:
        sem = asyncio.Semaphore(4)
        async with dev.s3_client() as s3:

            async def put(rel: str, body: bytes) -> None:
                async with sem:
                    await s3.put_object(Bucket="datasets", Key=f"{name}/{rel}", Body=body)

            await asyncio.gather(*(put(rel, body) for rel, body in bodies.items()))

    asyncio.run(upload())
    return f"s3://datasets/{name}/", {r: hashlib.sha256(b).hexdigest() for r, b in bodies.items()}


def _files_done(doc: dict[str, object]) -> int:
    requests = doc["requests"]
    assert isinstance(requests, list)
    return sum(r["nodes"].get(NODE, {}).get("files_done", 0) for r in requests)


def _agent_pids(dev: DevCluster, epoch: int) -> list[int]:
    """Pids of this cluster's agents for NODE started with leader epoch ``epoch``."""
    cache_dir = str(dev.info.node_cache(NODE))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        mine = _after(argv, "--cache-dir") == cache_dir and _after(argv, "--epoch") == str(epoch)
        if "agent" in argv and mine and proc.alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""


def _wait_epoch(cache: Path, state: str, number: int, log: Path) -> dict[str, object]:
    found: dict[str, object] = {}

    def recorded() -> bool:
        try:
            found.update(json.loads((cache / "epoch").read_text()))
        except (OSError, ValueError):
            return False
        return found.get("state") == state and found.get("epoch") == number

    wait_until(f"epoch {number} recorded in {cache}", recorded, 300, log)
    return found


def _wait_new_lock_holder(cache: Path, orphan: int, log: Path) -> float:
    """When the new agent took the cache's lock (agent.lock says who holds it, since when)."""
    found: dict[str, float] = {}

    def taken() -> bool:
        try:
            found.update(json.loads((cache / "agent.lock").read_text()))
        except (OSError, ValueError):
            return False
        return found.get("pid") not in (None, orphan)

    wait_until("the new agent to hold the cache's lock", taken, 120, log)
    return float(found["since"])


class _CommitWatch:
    """The change time of each object in the cache when first seen (a commit's rename, or the
    link into a view right after it), looked at every 0.1 s."""

    def __init__(self, objects: Path) -> None:
        self.objects = objects
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._look()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._look()

    def _look(self) -> None:
        for path in self.objects.glob("*/*"):
            if ".tmp-" in path.name or path.name in self.first_seen:
                continue
            try:
                self.first_seen[path.name] = path.stat().st_ctime
            except FileNotFoundError:
                continue
