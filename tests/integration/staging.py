"""Helpers for stage-in integration tests: a running daemon on the dev cluster, datasets, jobs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devcluster import proc
from devcluster.cluster import DevCluster
from devcluster.site import hpcstage_bin, start_daemon, stop_daemon, write_site_config
from hpcstage.cli.client import Client, client_for
from hpcstage.config.load import load_config
from hpcstage.errors import ApiError


@dataclass
class Stager:
    """A daemon running as the service account against the dev cluster."""

    dev: DevCluster
    config: Path
    log_name: str
    pid: int = 0
    client: Client = field(init=False)
    jobs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client = client_for(load_config(self.config), timeout=10)

    def start(self) -> None:
        self.pid = start_daemon(self.dev, self.config, self.log_name)
        wait_until("the daemon's API", self._healthy, 60, self.log)

    def _healthy(self) -> bool:
        try:
            return bool(self.client.get("/api/v1/health")["last_tick"])
        except ApiError:
            return False

    def stop(self, hard: bool = False) -> None:
        if self.pid:
            stop_daemon(self.pid, hard=hard)
            self.pid = 0

    @property
    def log(self) -> Path:
        return Path(self.dev.info.base) / "log" / self.log_name

    def env(self) -> dict[str, str]:
        """What a job needs to find hpcstage and its config (as `module load` would give)."""
        return {
            "HPCSTAGE_CONFIG": str(self.config),
            "PATH": f"{Path(hpcstage_bin()).parent}:/usr/local/bin:/usr/bin:/bin",
        }

    def submit(self, user: str, script: str, *args: str) -> int:
        wd = self.dev.workdir(user)
        job = self.dev.sbatch(user, script, f"--output={wd}/%j.out", *args, env=self.env())
        self.jobs.append(job)
        return job

    def output(self, user: str, job: int) -> str:
        return (self.dev.workdir(user) / f"{job}.out").read_text(errors="replace")

    def doc(self, job: int) -> dict[str, Any]:
        result: dict[str, Any] = self.client.get(f"/api/v1/jobs/{job}")
        return result

    def wait_doc(
        self, job: int, what: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 120
    ) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def check() -> bool:
            try:
                found.update(self.doc(job))
            except ApiError:
                return False
            return pred(found)

        wait_until(f"job {job}: {what}", check, timeout, self.log)
        return found

    def cli(self, user: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the hpcstage CLI as ``user``, as a scientist would."""
        return self.dev.run_as(user, [hpcstage_bin(), *args], env=self.env(), check=check)

    def cancel_all(self) -> None:
        if self.jobs:
            proc.run(["scancel", *map(str, self.jobs)], env=self.dev.client_env(), check=False)
            self.jobs.clear()


TEST_DATABASE = "hpcstage_test_"  # + <pid of the test run>_<purpose>_<random>


@contextlib.contextmanager
def scratch_database(admin_url: str, purpose: str) -> Iterator[str]:
    """The URL of a new PostgreSQL database for one fixture, dropped after it. Its name
    carries this process's pid: a run that is killed before dropping it leaves it to the
    next run's :func:`drop_stale_databases`."""
    from sqlalchemy import create_engine, text

    name = f"{TEST_DATABASE}{os.getpid()}_{purpose}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin_url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def drop_stale_databases(admin_url: str) -> list[str]:
    """Drop the scratch databases of test runs on this machine that no longer run (killed
    before their fixtures could clean up); those of live runs are left alone."""
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    dropped = []
    try:
        with admin.connect() as conn:
            names = conn.execute(
                text("SELECT datname FROM pg_database WHERE starts_with(datname, :prefix)"),
                {"prefix": TEST_DATABASE},
            ).scalars()
            for name in list(names):
                pid = name.removeprefix(TEST_DATABASE).split("_", 1)[0]
                if pid.isdigit() and not _running(int(pid)):
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    dropped.append(name)
    finally:
        admin.dispose()
    return dropped


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def private_cluster(what: str, name: str, **options: Any) -> Iterator[DevCluster]:
    """A fixture's body: a dev cluster of its own under a fresh /tmp directory, stopped and
    removed after (left running with HPCSTAGE_TEST_KEEP=1, for debugging).

    ``what`` names it in messages and in the directory; ``options`` go to DevCluster
    (spank=, burst_buffer=).
    """
    if os.geteuid() != 0:
        pytest.fail("integration tests start Slurm and sshd and must run as root")
    base = Path(tempfile.mkdtemp(prefix=f"hpcstage-{what}-", dir="/tmp"))
    # World-traversable (not pytest's 0700 tmp dir): job users must reach slurm.conf and munge.
    base.chmod(0o755)
    dev = DevCluster(base, name=name, **options)
    keep = os.environ.get("HPCSTAGE_TEST_KEEP") == "1"
    try:
        dev.up()
        yield dev
    finally:
        if keep:
            print(f"\nHPCSTAGE_TEST_KEEP=1: {what} cluster left running at {base}")
        else:
            dev.down()
            shutil.rmtree(base, ignore_errors=True)


# A tiny cache, so that eviction has something to do: 1 MiB, evict from 90 % down to 50 %.
TINY_CACHE = """[cache]
max_bytes = "1MiB"
high_watermark = 0.9
low_watermark = 0.5
"""


def with_tiny_cache(text: str) -> str:
    """A site config's text with TINY_CACHE for its [cache] (``running_stager``'s ``edit``)."""
    assert '[cache]\nmax_bytes = "20GiB"\n' in text
    return text.replace('[cache]\nmax_bytes = "20GiB"\n', TINY_CACHE)


def running_stager(
    dev: DevCluster,
    name: str,
    config_name: str = "",
    edit: Callable[[str], str] | None = None,
    **config: Any,
) -> Iterator[Stager]:
    """A module fixture's body: a daemon with its own site config and fresh state, stopped after.

    The config is ``<name>.toml`` (or ``config_name``), the log ``daemon-<name>.log``;
    ``config`` goes to write_site_config (policy=, extra=, concurrency=, state_url=, ...);
    ``edit`` rewrites the config's text before the daemon reads it (a key in an existing
    table, which ``extra`` cannot add).
    """
    path = write_site_config(dev, name=config_name or f"{name}.toml", **config)
    if edit is not None:
        path.write_text(edit(path.read_text()))
    (Path(dev.info.base) / "daemon" / "state.db").unlink(missing_ok=True)
    st = Stager(dev, path, f"daemon-{name}.log")
    st.start()
    try:
        yield st
    finally:
        st.cancel_all()
        st.stop()


def wait_until(what: str, pred: Callable[[], bool], timeout: float, log: Path | None) -> None:
    proc.wait_for(what, pred, timeout, log)


def make_dataset(
    dev: DevCluster, files: dict[str, bytes], under: str | None = None
) -> tuple[str, dict[str, str]]:
    """Upload files under a fresh prefix of s3://datasets through the S3 API.

    Returns the s3:// prefix and the SHA-256 of each file by its relative path. (Writing into
    rclone's directory directly is not seen by listings once the bucket was listed.)
    """
    name = under or f"ds-{uuid.uuid4().hex[:8]}"
    asyncio.run(_put_all(dev, {f"{name}/{rel}": body for rel, body in files.items()}))
    return f"s3://datasets/{name}/", {r: hashlib.sha256(b).hexdigest() for r, b in files.items()}


async def _put_all(dev: DevCluster, bodies: dict[str, bytes], parallel: int = 16) -> None:
    sem = asyncio.Semaphore(parallel)
    async with dev.s3_client() as s3:

        async def put(key: str, body: bytes) -> None:
            async with sem:
                await s3.put_object(Bucket="datasets", Key=key, Body=body)

        await asyncio.gather(*(put(k, b) for k, b in bodies.items()))


def small_files(count: int, size: int = 4096, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}f{i:05d}.dat": os.urandom(size) for i in range(count)}


def big_files(dev: DevCluster, count: int, size: int) -> tuple[str, int]:
    """``count`` objects of ``size`` bytes of noise, uploaded a few at a time."""
    name = f"big-{uuid.uuid4().hex[:8]}"
    chunk = os.urandom(size)

    async def upload() -> None:
        sem = asyncio.Semaphore(4)
        async with dev.s3_client() as s3:

            async def put(i: int) -> None:
                body = chunk[i:] + chunk[:i]  # distinct content per object
                async with sem:
                    await s3.put_object(Bucket="datasets", Key=f"{name}/part{i:03d}.bin", Body=body)

            await asyncio.gather(*(put(i) for i in range(count)))

    asyncio.run(upload())
    return f"s3://datasets/{name}/", count


def busy(stager: Stager, node: str, seconds: int, limit_min: int = 1) -> int:
    """Occupy ``node`` with bob's sleep job; returns once it runs."""
    job = stager.submit(
        "bob",
        f"#!/bin/bash\nsleep {seconds}\n",
        f"--nodelist={node}",
        f"--time={limit_min}",
        "--job-name=busy",
    )
    stager.dev.wait_job(job, states=("RUNNING",), timeout=60)
    return job


CHECKSUM_JOB = """#!/bin/bash
#SBATCH --job-name=checksums
#HPCSTAGE --stage-in={src}
eval "$(hpcstage env)"
echo "node=$SLURMD_NODENAME dir=$HPCSTAGE_DIR"
cd "$HPCSTAGE_DIR/{dest}" && find . -type f | sort | xargs sha256sum
"""


def parse_sums(output: str) -> dict[str, str]:
    sums = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1].removeprefix("./")] = parts[0]
    return sums


def fetched_on(doc: dict[str, Any], node: str) -> int:
    return sum(r["nodes"].get(node, {}).get("fetched_files", 0) for r in doc["requests"])
