"""Process helpers for the dev cluster: run commands with clear errors, track and stop by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from devcluster.errors import ClusterError

# Every process the dev cluster starts carries this variable, so `down` can find stragglers
# (slurmstepd, job steps) that were started on our behalf and only those.
MARKER = "HPCSTAGE_DEVCLUSTER"


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; on failure raise ClusterError naming the command and its stderr."""
    try:
        proc = subprocess.run(
            list(argv),
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            errors="replace",  # job output and files may be binary
            timeout=timeout,
            check=False,
            input=input_text,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"{argv[0]}: {exc}") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ClusterError(f"`{' '.join(argv)}` exited {proc.returncode}: {detail}")
    return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for(what: str, predicate: Callable[[], bool], timeout: float, log: Path | None) -> None:
    """Poll ``predicate`` until true; raise ClusterError with the log's tail on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{log_tail(log)}")


def log_tail(log: Path | None, lines: int = 15) -> str:
    """The last lines of a log file, formatted for an error message ('' if none)."""
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log} ---\n" + "\n".join(tail)


def read_pid(pidfile: Path, timeout: float = 15) -> int:
    """Wait for a daemon's pid file and return the pid in it."""
    wait_for(f"pid file {pidfile}", lambda: _pid_in(pidfile) is not None, timeout, None)
    pid = _pid_in(pidfile)
    assert pid is not None
    return pid


def _pid_in(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop_pid(pid: int, grace: float = 10) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Quiet if already gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(pid):
                _reap(pid)
                return
            time.sleep(0.1)


def _reap(pid: int) -> None:
    # Children we spawned ourselves (rclone) must be waited for, or they stay zombies.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def marked_pids(marker_value: str) -> list[int]:
    """Pids of processes whose environment has MARKER=marker_value (ours), excluding us."""
    needle = f"{MARKER}={marker_value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found
