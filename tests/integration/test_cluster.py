"""The dev cluster is real: jobs run as users on n1..n3, S3 answers, sshd lets the daemon in."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import asyncssh
import pytest
from aiobotocore.session import get_session

from devcluster import proc
from devcluster.cluster import DevCluster

pytestmark = pytest.mark.integration

NODE_SCRIPT = """#!/bin/bash
#SBATCH --time=2
echo "$(whoami) $SLURMD_NODENAME $SLURM_JOB_ACCOUNT"
sleep 4
"""


def test_jobs_run_as_the_user_on_every_node(cluster: DevCluster) -> None:
    wd = cluster.workdir("alice")
    jobs = [
        cluster.sbatch("alice", NODE_SCRIPT, "--account=chem", f"--output={wd}/%j.out")
        for _ in cluster.info.nodes
    ]
    for job in jobs:
        assert cluster.wait_job(job) == "COMPLETED", cluster.job_state(job)
    lines = [(wd / f"{job}.out").read_text().split() for job in jobs]
    assert {line[0] for line in lines} == {"alice"}
    assert {line[2] for line in lines} == {"chem"}
    # One CPU per node and three jobs at once: Slurm must spread them over all nodes.
    assert sorted(line[1] for line in lines) == sorted(cluster.info.nodes)


def test_backfill_plans_nodes_for_a_pending_job(cluster: DevCluster) -> None:
    busy = [
        cluster.sbatch("bob", "#!/bin/bash\nsleep 60\n", "--time=1", "--output=/dev/null")
        for _ in cluster.info.nodes
    ]
    for job in busy:
        cluster.wait_job(job, states=("RUNNING",))
    pending = cluster.sbatch("alice", "#!/bin/bash\ntrue\n", "--time=1", "--output=/dev/null")
    try:
        planned = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and planned in ("", "(null)"):
            planned = cluster.job_state(pending).get("SchedNodeList", "")
            time.sleep(0.5)
        assert planned in cluster.info.nodes, f"no planned node: {cluster.job_state(pending)}"
        assert cluster.job_state(pending)["JobState"] == "PENDING"
    finally:
        proc.run(["scancel", str(pending), *map(str, busy)], env=cluster.client_env())


def test_s3_put_and_get(cluster: DevCluster) -> None:
    info = cluster.info

    async def roundtrip() -> tuple[bytes, str]:
        session = get_session()
        async with session.create_client(
            "s3",
            endpoint_url=info.s3_endpoint,
            aws_access_key_id=info.s3_access_key,
            aws_secret_access_key=info.s3_secret_key,
            region_name="us-east-1",
        ) as s3:
            await s3.put_object(Bucket="datasets", Key="probe/hello.txt", Body=b"hello, S3")
            got = await s3.get_object(Bucket="datasets", Key="probe/hello.txt")
            return await got["Body"].read(), got["ETag"]

    body, etag = asyncio.run(roundtrip())
    assert body == b"hello, S3"
    # A single-part upload's ETag is the MD5 of the body.
    assert etag.strip('"') == hashlib.md5(body, usedforsecurity=False).hexdigest()
    assert (Path(info.base) / "s3" / "datasets" / "probe" / "hello.txt").read_bytes() == body


def test_s3_refuses_wrong_credentials(cluster: DevCluster) -> None:
    async def attempt() -> None:
        async with get_session().create_client(
            "s3",
            endpoint_url=cluster.info.s3_endpoint,
            aws_access_key_id="nobody",
            aws_secret_access_key="wrong",
            region_name="us-east-1",
        ) as s3:
            await s3.list_objects_v2(Bucket="datasets")

    with pytest.raises(Exception, match=r"AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch"):
        asyncio.run(attempt())


def test_ssh_as_the_service_account(cluster: DevCluster) -> None:
    info = cluster.info

    async def whoami() -> str:
        async with asyncssh.connect(
            "127.0.0.1",
            port=info.sshd_port,
            username="hpcstage",
            client_keys=[info.ssh_key],
            known_hosts=info.known_hosts,
        ) as conn:
            result = await conn.run("id -un; echo $HOME", check=True)
            return str(result.stdout)

    assert asyncio.run(whoami()).split() == ["hpcstage", "/home/hpcstage"]


def test_down_stops_everything_it_started() -> None:
    base = Path(tempfile.mkdtemp(prefix="hpcstage-down-", dir="/tmp"))
    dev = DevCluster(base, name="hpcdown", nodes=("d1",))
    try:
        info = dev.up()
        job = dev.sbatch("alice", "#!/bin/bash\nsleep 300\n", "--output=/dev/null")
        dev.wait_job(job, states=("RUNNING",))
        ports = [info.sshd_port, int(info.s3_endpoint.rsplit(":", 1)[1])]
        dev.down()
        assert [name for name, pid in info.pids.items() if proc.alive(pid)] == []
        assert proc.marked_pids(str(base)) == []
        assert [p for p in ports if proc.port_open(p)] == []
    finally:
        dev.down()
        shutil.rmtree(base, ignore_errors=True)
