"""Pinned object versions (``--stage-in=s3://bucket/key?versionId=V``) on the real dev cluster:
Slurm jobs, sshd, the agents on the nodes and a daemon whose store is a versioned bucket.

The dev cluster's S3 server (``rclone serve s3``) keeps no versions, so this module starts
moto's S3 server on loopback (in memory, stopped after the module) and points the daemon's
``[store]`` at it. Its credentials reach the daemon as a site's would: an AWS profile of the
service account (``~/.aws/config`` in the daemon's HOME) named by ``store.profile``; the daemon
hands them to the agents. A job that pins the older version gets that version's bytes, byte
exact, next to the key's current object staged without a version; a job pinning a version
that does not exist fails naming the version, in its output and in ``hpcstage status``.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import pwd
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.session
import pytest

from devcluster import users
from devcluster.cluster import DevCluster
from devcluster.proc import free_port, port_open
from devcluster.site import daemon_dir

from .staging import Stager, parse_sums, running_stager

pytestmark = pytest.mark.integration

BUCKET = "versioned"
PROFILE = "versioned-store"


@dataclass(frozen=True)
class Moto:
    """moto's S3 server on loopback, and the keys of the profile the daemon uses for it."""

    endpoint: str
    access_key: str
    secret_key: str

    def client(self) -> Any:
        return botocore.session.Session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


def _wait_for_port(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120  # a loaded machine may take long to import moto
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if server.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"moto_server did not come up:\n{log.read_text(errors='replace')[-2000:]}")


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    """moto's S3 server on a free loopback port with a bucket that keeps versions."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        pytest.fail("moto_server not found: install the dev extras (moto[server])")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hpcstage-moto-") as base:
        log = Path(base) / "moto.log"
        with log.open("wb") as out:
            server = subprocess.Popen(
                [str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
            )
        try:
            _wait_for_port(port, server, log)
            found = Moto(f"http://127.0.0.1:{port}", "versions" + uuid.uuid4().hex[:8], "s3cr3t")
            s3 = found.client()
            s3.create_bucket(Bucket=BUCKET)
            s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
            yield found
        finally:
            _stop(server)
    assert not port_open(port), f"moto_server still listens on port {port}"


def _add_profile(dev: DevCluster, moto: Moto) -> None:
    """The store's keys as a profile in the service account's ~/.aws/config (the daemon's HOME
    is its state directory), kept beside any profile another module wrote there."""
    ddir = daemon_dir(dev)
    aws = ddir / ".aws"
    aws.mkdir(exist_ok=True)
    path = aws / "config"
    config = configparser.ConfigParser(interpolation=None)
    config.read(path)
    config[f"profile {PROFILE}"] = {
        "aws_access_key_id": moto.access_key,
        "aws_secret_access_key": moto.secret_key,
    }
    with path.open("w") as out:
        config.write(out)
    svc = pwd.getpwnam(users.SERVICE.name)
    for owned in (aws, path):
        os.chown(owned, svc.pw_uid, svc.pw_gid)
    path.chmod(0o600)


@pytest.fixture(scope="module")
def stager(cluster: DevCluster, moto: Moto) -> Iterator[Stager]:
    _add_profile(cluster, moto)
    old = f'endpoint_url = "{cluster.info.s3_endpoint}"\n'

    def on_moto(text: str) -> str:
        assert text.count(old) == 1, old
        new = f'endpoint_url = "{moto.endpoint}"\nprofile = "{PROFILE}"\n'
        return text.replace(old, new)

    yield from running_stager(cluster, "versions", edit=on_moto, concurrency=8)


def _put(moto: Moto, key: str, body: bytes) -> str:
    """Put a new version of ``key``; its version id."""
    version: str = moto.client().put_object(Bucket=BUCKET, Key=key, Body=body)["VersionId"]
    return version


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


JOB = """#!/bin/bash
#SBATCH --job-name=versions
#HPCSTAGE --stage-in=s3://{bucket}/{key}?versionId={old}:old.bin
#HPCSTAGE --stage-in=s3://{bucket}/{key}:current.bin
eval "$(hpcstage env)"
cd "$HPCSTAGE_DIR" && sha256sum old.bin current.bin
"""


def test_a_job_gets_the_pinned_older_version_beside_the_current_object(
    stager: Stager, moto: Moto
) -> None:
    key = f"v-{uuid.uuid4().hex[:8]}/model.bin"
    old, new = os.urandom(300_000), os.urandom(300_000)  # same size: only versions differ
    old_id, new_id = _put(moto, key, old), _put(moto, key, new)
    assert old_id != new_id
    job = stager.submit("alice", JOB.format(bucket=BUCKET, key=key, old=old_id))
    state = stager.dev.wait_job(job, timeout=300)
    out = stager.output("alice", job)
    assert state == "COMPLETED", out
    assert parse_sums(out) == {"old.bin": _sha(old), "current.bin": _sha(new)}, out


MISSING_JOB = """#!/bin/bash
#HPCSTAGE --stage-in=s3://{bucket}/{key}?versionId={version}:in.bin
eval "$(hpcstage env || echo exit 1)"
echo RAN
"""


def test_a_version_that_does_not_exist_fails_the_job_naming_it(stager: Stager, moto: Moto) -> None:
    key = f"v-{uuid.uuid4().hex[:8]}/model.bin"
    _put(moto, key, b"the only version")
    version = "NoSuchVersion" + uuid.uuid4().hex[:10]
    job = stager.submit("bob", MISSING_JOB.format(bucket=BUCKET, key=key, version=version))
    assert stager.dev.wait_job(job, timeout=300) == "FAILED"
    out = stager.output("bob", job)
    assert "RAN" not in out, out
    # The cause names the version, not only the directive: the object itself exists.
    cause = f"s3://{BUCKET}/{key}?versionId={version}: no such version"
    assert cause in out, out
    status = stager.cli("bob", "status", str(job)).stdout
    assert cause in status, status
