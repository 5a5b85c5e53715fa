"""Store credentials that expire are renewed while the daemon runs (issue 15 item 11).

The daemon's profile takes its keys from a ``credential_process`` (as STS, SSO and instance
roles do, they carry an expiry 12 minutes away, inside botocore's refresh window). The S3
server first accepts key 1; then the provider hands out key 2 and the server stops taking
key 1, as an expired session token is refused. A job staged after that must still get its
data: before, the keys were resolved once at start-up and every staging failed from then on.
"""

from __future__ import annotations

import os
import pwd
import secrets
import sys
from collections.abc import Iterator

import pytest

from devcluster import users
from devcluster.cluster import DevCluster
from devcluster.site import daemon_dir

from .staging import Stager, make_dataset, running_stager, small_files, wait_until

pytestmark = pytest.mark.integration

PROVIDER = """import datetime, json, pathlib
key = pathlib.Path({key!r}).read_text().split()
soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=12)
print(json.dumps({{"Version": 1, "AccessKeyId": key[0], "SecretAccessKey": key[1],
                  "Expiration": soon.isoformat()}}))
"""
JOB = '#!/bin/bash\n#HPCSTAGE --stage-in={src}\neval "$(hpcstage env)"\necho STAGED\n'


def _key() -> tuple[str, str]:
    return "rot" + secrets.token_hex(4), secrets.token_urlsafe(18)


class Rotation:
    """The provider's key file and the two keys it hands out."""

    def __init__(self, dev: DevCluster) -> None:
        self.dev, self.first, self.second = dev, _key(), _key()
        ddir = daemon_dir(dev)
        self.key_file = ddir / "rotating-key"
        provider = ddir / "rotating-provider.py"
        provider.write_text(PROVIDER.format(key=str(self.key_file)))
        aws = ddir / ".aws"  # the daemon's HOME is ddir: botocore reads ~/.aws/config
        aws.mkdir(exist_ok=True)
        (aws / "config").write_text(
            f"[profile rotating]\ncredential_process = {sys.executable} {provider}\n"
        )
        svc = pwd.getpwnam(users.SERVICE.name)
        for path in (aws, aws / "config", provider):
            os.chown(path, svc.pw_uid, svc.pw_gid)
        self.hand_out(self.first)

    def hand_out(self, key: tuple[str, str]) -> None:
        svc = pwd.getpwnam(users.SERVICE.name)
        self.key_file.write_text(" ".join(key) + "\n")
        os.chown(self.key_file, svc.pw_uid, svc.pw_gid)
        self.key_file.chmod(0o600)

    def store_accepts(self, *keys: tuple[str, str]) -> None:
        """Restart the S3 server accepting the site's key (the tests' own) and ``keys``."""
        self.dev.stop_s3()
        self.dev.start_s3(extra_keys=keys)


@pytest.fixture(scope="module")
def rotation(cluster: DevCluster) -> Iterator[Rotation]:
    made = Rotation(cluster)
    made.store_accepts(made.first, made.second)
    try:
        yield made
    finally:
        made.store_accepts()  # the site's key only, as the other modules expect


@pytest.fixture(scope="module")
def stager(cluster: DevCluster, rotation: Rotation) -> Iterator[Stager]:
    def rotating_profile(text: str) -> str:
        return text.replace("[store]\n", '[store]\nprofile = "rotating"\n', 1)

    yield from running_stager(cluster, "credentials", edit=rotating_profile)


def test_expiring_store_credentials_are_renewed_and_handed_to_agents(
    stager: Stager, rotation: Rotation
) -> None:
    src, _ = make_dataset(stager.dev, small_files(5))
    job = stager.submit("alice", JOB.format(src=src))
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
    # The provider now hands out key 2, and the store refuses key 1 from here on.
    rotation.hand_out(rotation.second)
    rotation.store_accepts(rotation.second)
    wait_until(
        "the daemon to renew its credentials",
        lambda: "S3 credentials renewed; handed to" in stager.log.read_text(),
        60,
        stager.log,
    )
    src, _ = make_dataset(stager.dev, small_files(5))
    job = stager.submit("alice", JOB.format(src=src))
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
    assert "STAGED" in stager.output("alice", job)
    assert rotation.first[1] not in stager.log.read_text()  # no secret in the log
    assert rotation.second[1] not in stager.log.read_text()
