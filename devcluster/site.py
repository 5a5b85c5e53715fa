"""The hpcstage daemon on a dev cluster: its site config, credentials, start and stop."""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from pathlib import Path

from devcluster import proc, users
from devcluster.cluster import DevCluster
from devcluster.errors import ClusterError


def hpcstage_bin() -> str:
    """The hpcstage command of this installation (the agents run the same one)."""
    beside = Path(sys.executable).parent / "hpcstage"
    found = str(beside) if beside.exists() else shutil.which("hpcstage")
    if not found:
        raise ClusterError("the hpcstage command is not installed next to this Python")
    return found


def write_site_config(
    dev: DevCluster,
    *,
    state_url: str = "",
    poll: str = "1s",
    lease_grace: str = "20s",
    concurrency: int = 32,
    name: str = "hpcstage.toml",
    policy: str = 'default = "allow"',
    extra: str = "",
    durable_before_read: bool = False,
) -> Path:
    """A site TOML for this cluster: S3, SSH to the nodes, admin_comment directives."""
    info = dev.info
    ddir = daemon_dir(dev)
    api_port = proc.free_port()
    text = f"""# Site configuration of the hpcstage dev cluster {info.name} (generated).
[site]
name = "{info.name}"
state_dir = "{ddir}"
state_url = "{state_url}"
log_level = "info"

[store]
endpoint_url = "{info.s3_endpoint}"
region = "us-east-1"

[slurm]
poll_interval = "{poll}"
directives_from = ["admin_comment"]

[nodes]
transport = "ssh"
address = "{{node_addr}}"
cache_dir = "{info.base}/nodes/{{node}}/cache"
agent_command = "{hpcstage_bin()} agent"
ssh_user = "{users.SERVICE.name}"
ssh_port = {info.sshd_port}
ssh_key = "{info.ssh_key}"
ssh_known_hosts = "{info.known_hosts}"

[cache]
max_bytes = "20GiB"
lease_grace = "{lease_grace}"
durable_before_read = {str(durable_before_read).lower()}

[transfer]
concurrency = {concurrency}

[api]
listen = "127.0.0.1:{api_port}"
auth = "munge"
munge_socket = "{info.base}/munge-run/munge.socket"

[policy]
{policy}
{extra}"""
    path = Path(info.base) / "etc" / name
    path.write_text(text)
    path.chmod(0o644)  # users' `hpcstage env` reads it: it holds no secret
    return path


def daemon_dir(dev: DevCluster) -> Path:
    """The service account's working directory: state, credentials, log."""
    ddir = Path(dev.info.base) / "daemon"
    ddir.mkdir(exist_ok=True)
    svc = pwd.getpwnam(users.SERVICE.name)
    os.chown(ddir, svc.pw_uid, svc.pw_gid)
    ddir.chmod(0o700)
    creds = ddir / "aws-credentials"
    creds.write_text(
        "[default]\n"
        f"aws_access_key_id = {dev.info.s3_access_key}\n"
        f"aws_secret_access_key = {dev.info.s3_secret_key}\n"
    )
    os.chown(creds, svc.pw_uid, svc.pw_gid)
    creds.chmod(0o600)
    return ddir


def start_daemon(dev: DevCluster, config: Path, log_name: str = "daemon.log") -> int:
    """Start ``hpcstage daemon`` as the service account, in the background; return its pid."""
    ddir = daemon_dir(dev)
    log = Path(dev.info.base) / "log" / log_name
    pidfile = ddir / "daemon.pid"
    svc = pwd.getpwnam(users.SERVICE.name)
    log.touch()
    os.chown(log, svc.pw_uid, svc.pw_gid)  # the log dir is root's; the file is the daemon's
    pidfile.unlink(missing_ok=True)
    env = [
        f"SLURM_CONF={dev.info.slurm_conf}",
        f"AWS_SHARED_CREDENTIALS_FILE={ddir}/aws-credentials",
        f"HOME={ddir}",
        f"{proc.MARKER}={dev.base}",
        "PYTHONUNBUFFERED=1",
        "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    ]
    script = f"echo $$ > {pidfile}; exec {hpcstage_bin()} daemon --config {config} >>{log} 2>&1"
    proc.run(
        [
            "start-stop-daemon",
            "--start",
            "--background",
            "--chuid",
            users.SERVICE.name,
            "--chdir",
            str(ddir),
            "--exec",
            "/usr/bin/env",
            "--",
            "-i",
            *env,
            "sh",
            "-c",
            script,
        ]
    )
    return proc.read_pid(pidfile)


def stop_daemon(pid: int, hard: bool = False) -> None:
    """SIGTERM (drain) or SIGKILL the daemon and wait until it is gone."""
    import signal

    if hard:
        os.kill(pid, signal.SIGKILL)
    proc.stop_pid(pid, grace=20)
