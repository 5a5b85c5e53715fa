"""Multi-tenancy on the real dev cluster: policy, MUNGE-authenticated API, isolation, secrets."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcstage import auth
from hpcstage.devcluster.cluster import DevCluster

from .staging import Stager, make_dataset, running_stager, small_files

pytestmark = pytest.mark.integration

POLICY = """default = "deny"

[[policy.rules]]
accounts = ["chem"]
read = ["s3://datasets/chem/"]
write = ["s3://results/chem/"]

[[policy.rules]]
accounts = ["bio"]
read = ["s3://datasets/bio/"]
write = ["s3://results/bio/"]
"""


QUOTAS = """
[quotas]
max_job_bytes = "1MiB"

[quotas.accounts]
bio = "300KiB"
"""


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "security", policy=POLICY, extra=QUOTAS)


def chem_dataset(stager: Stager, count: int = 5, account: str = "chem") -> str:
    under = f"{account}/{uuid.uuid4().hex[:6]}"
    src, _ = make_dataset(stager.dev, small_files(count), under=under)
    return src


def audit_lines(stager: Stager) -> list[dict[str, object]]:
    path = Path(stager.dev.info.base) / "daemon" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_staging_another_accounts_prefix_is_refused_and_audited(stager: Stager) -> None:
    src = chem_dataset(stager)
    script = f'#!/bin/bash\n#HPCSTAGE --stage-in={src}\neval "$(hpcstage env)"\necho RAN\n'
    job = stager.submit("bob", script, "--account=bio")
    assert stager.dev.wait_job(job, timeout=120) == "FAILED"
    out = stager.output("bob", job)
    assert "RAN" not in out
    assert f"no policy rule grants user bob (account bio) read access to {src}" in out, out
    refusals = [a for a in audit_lines(stager) if a["event"] == "refused" and a["job"] == job]
    assert refusals
    assert refusals[0]["user"] == "bob"
    assert src in str(refusals[0]["reason"])


def test_another_user_cannot_read_or_list_a_jobs_directory(stager: Stager) -> None:
    src = chem_dataset(stager)
    script = (
        f"#!/bin/bash\n#HPCSTAGE --stage-in={src}:data\n"
        'eval "$(hpcstage env)"\nls "$HPCSTAGE_DIR/data" | wc -l\nsleep 30\n'
    )
    job = stager.submit("alice", script, "--account=chem", "--nodelist=n1")
    doc = stager.wait_doc(
        job,
        "running with its inputs",
        lambda d: d["state"] == "RUNNING" and d["staging"].get("n1") == "ready",
    )
    view = stager.dev.info.node_cache("n1") / "jobs" / str(job)
    one = sorted((view / "data").iterdir())[0]
    mine = stager.dev.run_as("alice", ["cat", str(one)], check=False)
    assert mine.returncode == 0
    for argv in (["ls", str(view)], ["cat", str(one)], ["ls", str(view.parent)]):
        theirs = stager.dev.run_as("bob", argv, check=False)
        assert theirs.returncode != 0, (argv, theirs.stdout)
        assert "Permission denied" in theirs.stderr
    # Nor through the cache's own objects directory.
    objects = stager.dev.run_as("bob", ["ls", str(view.parent.parent / "objects")], check=False)
    assert objects.returncode != 0
    assert doc["user"] == "alice"


def test_the_api_shows_users_their_own_jobs_only(stager: Stager) -> None:
    src = chem_dataset(stager)
    script = f'#!/bin/bash\n#HPCSTAGE --stage-in={src}\neval "$(hpcstage env)"\n'
    job = stager.submit("alice", script, "--account=chem")
    stager.wait_doc(job, "known to the daemon", lambda d: d["job_id"] == job)
    theirs = stager.cli("bob", "status", str(job), check=False)
    assert theirs.returncode == 1
    assert "belongs to another user" in theirs.stderr
    listing = stager.cli("bob", "status", "--all", "--json").stdout
    assert all(j["user"] == "bob" for j in json.loads(listing))
    mine = stager.cli("alice", "status", "--all", "--json").stdout
    assert job in [j["job_id"] for j in json.loads(mine)]


def test_requests_without_or_with_a_replayed_credential_are_refused(stager: Stager) -> None:
    url = f"{stager.client.base_url}/api/v1/jobs"
    assert _status(url, None) == 401
    socket = f"{stager.dev.info.base}/munge-run/munge.socket"
    credential = auth.encode(socket)
    assert _status(url, f"MUNGE {credential}") == 200
    assert _status(url, f"MUNGE {credential}") == 401  # the same credential again: replayed
    assert _status(url, "MUNGE not-a-credential") == 401


def test_the_site_secret_appears_nowhere_a_user_can_read(stager: Stager) -> None:
    secret = stager.dev.info.s3_secret_key
    src = chem_dataset(stager)
    script = (
        f"#!/bin/bash\n#HPCSTAGE --stage-in={src}\n"
        "#HPCSTAGE --stage-in=s3://datasets/chem/no-such-object\n"
        'eval "$(hpcstage env)"\nenv\n'
    )
    job = stager.submit("alice", script, "--account=chem")
    assert stager.dev.wait_job(job, timeout=120) == "FAILED"
    seen = [stager.output("alice", job)]
    seen.append(stager.cli("alice", "status", str(job)).stdout)
    seen.append(stager.cli("alice", "status", str(job), "--json").stdout)
    seen.append(stager.cli("alice", "status", "--all", "--json").stdout)
    seen.append(stager.dev.run_as("alice", ["ps", "-eo", "args"]).stdout)
    assert all(secret not in text for text in seen)
    assert "no such object" in seen[1]  # the error reached the user, without the secret
    # Every file under the cluster that alice can read (logs, configs, job dirs, caches).
    found = stager.dev.run_as(
        "alice",
        ["grep", "-rlsF", "--", secret, stager.dev.info.base, "/home/alice"],
        check=False,
    )
    assert found.stdout.strip() == "", found.stdout


def _status(url: str, authorization: str | None) -> int:
    headers = {"Authorization": authorization} if authorization else {}
    req = urllib.request.Request(url, headers=headers)  # noqa: S310 - loopback test URL
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_job_over_the_per_job_limit_is_refused_with_the_rule(stager: Stager) -> None:
    src = chem_dataset(stager, count=300)  # 1.2 MiB > quotas.max_job_bytes = 1 MiB
    script = f'#!/bin/bash\n#HPCSTAGE --stage-in={src}\neval "$(hpcstage env)"\necho RAN\n'
    job = stager.submit("alice", script, "--account=chem")
    assert stager.dev.wait_job(job, timeout=120) == "FAILED"
    out = stager.output("alice", job)
    assert "RAN" not in out
    assert "over quota" in out and "quotas.max_job_bytes is 1MiB" in out, out


def test_an_account_over_its_node_quota_is_refused_and_others_data_kept(stager: Stager) -> None:
    first_src, second_src = chem_dataset(stager, 50, "bio"), chem_dataset(stager, 50, "bio")
    hold = (
        f"#!/bin/bash\n#HPCSTAGE --stage-in={first_src}:data\n"
        'eval "$(hpcstage env)"\nsleep 25\nls "$HPCSTAGE_DIR/data" | wc -l\n'
    )
    first = stager.submit("bob", hold, "--account=bio", "--nodelist=n3")
    stager.wait_doc(
        first,
        "running with its inputs on n3",
        lambda d: d["state"] == "RUNNING" and d["staging"].get("n3") == "ready",
    )
    script = f'#!/bin/bash\n#HPCSTAGE --stage-in={second_src}\neval "$(hpcstage env)"\n'
    second = stager.submit("bob", script, "--account=bio", "--nodelist=n3")
    doc = stager.wait_doc(second, "refused over quota", lambda d: bool(d["failure"]), 120)
    assert "over quota" in doc["failure"]
    assert "account bio may hold 300KiB on n3" in doc["failure"], doc["failure"]
    # The first job's leased inputs were not evicted to make room.
    assert stager.dev.wait_job(first, timeout=120) == "COMPLETED"
    assert stager.output("bob", first).split()[-1] == "50"


def _s3(dev: DevCluster, method: str, **kw: object) -> object:
    async def run() -> object:
        async with dev.s3_client() as s3:
            result = await getattr(s3, method)(**kw)
            return await result["Body"].read() if "Body" in result else result

    return asyncio.run(run())


def test_a_restore_is_checked_against_the_policy_of_today(stager: Stager) -> None:
    # A recycle-bin entry of alice's job whose key she may not write (the rules changed since
    # the stage-out, or someone with bucket access put it there): restoring it would make the
    # service account write bio's prefix for her.
    src = chem_dataset(stager)
    script = f'#!/bin/bash\n#HPCSTAGE --stage-in={src}\neval "$(hpcstage env)"\n'
    job = stager.submit("alice", script, "--account=chem")
    stager.wait_doc(job, "known to the daemon", lambda d: d["job_id"] == job)
    tag = uuid.uuid4().hex[:8]
    theirs, mine = f"bio/{tag}/table.csv", f"chem/{tag}/table.csv"
    for key in (theirs, mine):
        _s3(stager.dev, "put_object", Bucket="results", Key=key, Body=b"current\n")
        entry = f".hpcstage-trash/2026-01-01/{job}/{key}"
        _s3(stager.dev, "put_object", Bucket="results", Key=entry, Body=b"from the bin\n")
    refused = stager.cli(
        "alice",
        "trash",
        "restore",
        f"s3://results/.hpcstage-trash/2026-01-01/{job}/{theirs}",
        check=False,
    )
    assert refused.returncode != 0
    assert "restore refused: no policy rule grants user alice (account chem) write" in (
        refused.stderr
    ), refused.stderr
    assert _s3(stager.dev, "get_object", Bucket="results", Key=theirs) == b"current\n"
    # Where she may write, the same restore goes through.
    stager.cli("alice", "trash", "restore", f"s3://results/.hpcstage-trash/2026-01-01/{job}/{mine}")
    assert _s3(stager.dev, "get_object", Bucket="results", Key=mine) == b"from the bin\n"
