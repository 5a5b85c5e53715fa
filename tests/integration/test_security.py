"""Multi-tenancy on the real dev cluster: policy, MUNGE-authenticated API, isolation, secrets."""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import proc, users
from devcluster.cluster import DevCluster
from hpcstage import auth
from hpcstage.cli.client import client_for
from hpcstage.config.load import load_config
from hpcstage.errors import ApiError

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


METRICS_TOKEN = "scrape-" + uuid.uuid4().hex
SHARED_RULE = """
[[policy.rules]]
accounts = ["chem", "bio"]
read = ["{base}/shared/"]
"""


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    token = Path(cluster.info.base) / "etc" / "metrics-token"
    token.write_text(METRICS_TOKEN + "\n")
    svc = pwd.getpwnam(users.SERVICE.name)
    os.chown(token, svc.pw_uid, svc.pw_gid)
    token.chmod(0o600)

    def with_token(text: str) -> str:
        return text.replace('auth = "munge"\n', f'auth = "munge"\nmetrics_token_file = "{token}"\n')

    shared = SHARED_RULE.format(base=cluster.info.base)
    yield from running_stager(
        cluster, "security", policy=POLICY + shared, extra=QUOTAS, edit=with_token
    )


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
    refusals = [a for a in audit_lines(stager) if a["event"] == "refused" and a.get("job") == job]
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


def test_a_credential_whose_payload_claims_root_is_refused(stager: Stager) -> None:
    """Issue 15 item 1: unmunge prints the user's payload after the metadata, so a payload of
    'UID:0' lines made the daemon see root. Alice forges one and asks for an admin action."""
    socket = f"{stager.dev.info.base}/munge-run/munge.socket"
    url = f"{stager.client.base_url}/api/v1/nodes/n1/evict"
    forged = stager.dev.run_as(
        "alice", ["sh", "-c", f"printf 'UID:0\\nGID:0\\n' | munge --socket {socket}"]
    ).stdout.strip()
    code, body = _post(url, f"MUNGE {forged}")
    assert code == 401, body
    assert "payload" in body
    refused = [a for a in audit_lines(stager) if a.get("event") == "auth-refused"]
    assert "payload" in str(refused[-1])
    # Alice's own credential without a payload still works, as alice (not an admin).
    plain = stager.dev.run_as("alice", ["munge", "--no-input", "--socket", socket]).stdout
    assert _post(url, f"MUNGE {plain.strip()}")[0] == 403


def test_only_admins_may_ask_on_behalf_of_another_uid(stager: Stager) -> None:
    """burst_buffer.lua (SlurmUser, an admin) answers bbstat as the asking uid; a user who
    sends the same header claiming uid 0 is refused, not promoted."""
    src = chem_dataset(stager)
    script = f"#!/bin/bash\n#HPCSTAGE --stage-in={src}\n"
    job = stager.submit("alice", script, "--account=chem", "--hold")
    stager.wait_doc(job, "known to the daemon", lambda d: d["job_id"] == job)
    bob = stager.cli("bob", "status", "--for-uid", "0", str(job), check=False)
    assert bob.returncode == 1 and "only admins may ask on behalf" in bob.stderr, bob
    admin = client_for(load_config(stager.config), timeout=10)  # root: an admin
    admin.for_uid = pwd.getpwnam("alice").pw_uid
    assert admin.get(f"/api/v1/jobs/{job}")["user"] == "alice"
    admin.for_uid = pwd.getpwnam("bob").pw_uid
    with pytest.raises(ApiError, match="belongs to another user"):
        admin.get(f"/api/v1/jobs/{job}")


def test_the_dashboard_shows_nothing_without_a_login_and_users_their_own_jobs(
    stager: Stager,
) -> None:
    """Issue 15 item 14: the page at / listed every user's jobs, sources and errors to anyone
    who reached the port. Now: nothing without a session; `hpcstage dashboard` prints a
    one-minute, single-use link that sets one; each user sees their own jobs."""
    src = chem_dataset(stager)
    script = f"#!/bin/bash\n#HPCSTAGE --stage-in={src}\n"
    job = stager.submit("alice", script, "--account=chem", "--hold")
    stager.wait_doc(job, "known to the daemon", lambda d: d["job_id"] == job)
    base = stager.client.base_url
    code, page = _get(base + "/")
    assert code == 401 and src not in page and "alice" not in page, page
    assert "hpcstage dashboard" in page  # says how to get in
    link = stager.cli("alice", "dashboard").stdout.strip()
    assert link.startswith(f"{base}/login?token="), link
    browser = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    with browser.open(link, timeout=10) as resp:  # follows the redirect to /
        page = resp.read().decode()
    assert f"<td>{job}</td><td>alice</td>" in page, page
    assert _get(link)[0] == 401  # used once already
    bobs = stager.cli("bob", "dashboard").stdout.strip()
    bob_browser = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    with bob_browser.open(bobs, timeout=10) as resp:
        page = resp.read().decode()
    assert "as seen by bob" in page and "<td>alice</td>" not in page, page
    forged = bobs.split("token=")[1][:-4] + "AAAA"  # a changed signature
    assert _get(f"{base}/login?token={forged}")[0] == 401


def test_metrics_need_the_scrape_token_or_an_admin(stager: Stager) -> None:
    url = f"{stager.client.base_url}/metrics"
    assert _get(url)[0] == 401
    assert _get(url, "Bearer not-the-token")[0] == 401
    code, text = _get(url, f"Bearer {METRICS_TOKEN}")
    assert code == 200 and "hpcstage_stagings" in text, text
    socket = f"{stager.dev.info.base}/munge-run/munge.socket"
    bob = stager.dev.run_as("bob", ["munge", "--no-input", "--socket", socket]).stdout.strip()
    assert _get(url, f"MUNGE {bob}")[0] == 403
    assert _get(url, f"MUNGE {auth.encode(socket)}")[0] == 200  # root: an admin


def _get(url: str, authorization: str = "") -> tuple[int, str]:
    headers = {"Authorization": authorization} if authorization else {}
    req = urllib.request.Request(url, headers=headers)  # noqa: S310 - loopback test URL
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_shared_file_is_staged_only_for_users_who_may_read_it(stager: Stager) -> None:
    """Issue 15 item 13: the agent reads shared-filesystem sources as the service account.
    Alice's private file, which the site lets the stager read (an ACL), is inside a prefix the
    policy grants both accounts; Bob's job asks for it and must not get it."""
    home = Path(stager.dev.info.base) / "shared" / f"alice-{uuid.uuid4().hex[:6]}"
    home.mkdir(parents=True)
    home.parent.chmod(0o755)
    secret = home / "secret.txt"
    secret.write_text("alice's unpublished result\n")
    alice = pwd.getpwnam("alice")
    for path, mode, acl in ((home, 0o700, "rx"), (secret, 0o600, "r")):
        os.chown(path, alice.pw_uid, alice.pw_gid)
        path.chmod(mode)
        subprocess.run(["setfacl", "-m", f"u:{users.SERVICE.name}:{acl}", str(path)], check=True)
    job = (
        f"#!/bin/bash\n#HPCSTAGE --stage-in={secret}\n"
        'eval "$(hpcstage env)"\ncat "$HPCSTAGE_DIR/secret.txt"\n'
    )
    bobs = stager.submit("bob", job, "--account=bio")
    assert stager.dev.wait_job(bobs, timeout=120) == "FAILED"
    out = stager.output("bob", bobs)
    assert "unpublished" not in out, out
    assert f"{home}: bob may not enter it" in out, out
    alices = stager.submit("alice", job, "--account=chem")
    assert stager.dev.wait_job(alices, timeout=120) == "COMPLETED", stager.output("alice", alices)
    assert "alice's unpublished result" in stager.output("alice", alices)


def _post(url: str, authorization: str) -> tuple[int, str]:
    req = urllib.request.Request(  # noqa: S310 - loopback test URL
        url, data=b"", method="POST", headers={"Authorization": authorization}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


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


PIN_JOB = """#!/bin/bash
#HPCSTAGE --stage-in={src}:data
eval "$(hpcstage env)"
cd "$HPCSTAGE_DIR"
stat -c 'INODE %i' data/*
mkdir pin
# The attack: move the inputs (hardlinks, the job's lease on the cached objects) into a
# directory of one's own, then make it undeletable to the service account.
mv data/* pin/ && echo MOVED || echo NOT-MOVED
ln data/f00000.dat pin/link && echo LINKED || echo NOT-LINKED
cp data/f00001.dat pin/own
chmod 500 pin
# The same with outputs: a private file in a private directory.
mkdir out
echo result > out/result
chmod 600 out/result out
"""


def test_a_job_cannot_pin_its_inputs_by_making_its_directory_undeletable(
    stager: Stager,
) -> None:
    src = chem_dataset(stager, count=3)
    job = stager.submit("alice", PIN_JOB.format(src=src), "--account=chem", "--nodelist=n1")
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
    out = stager.output("alice", job)
    inodes = {int(line.split()[1]) for line in out.splitlines() if line.startswith("INODE ")}
    assert len(inodes) == 3, out
    cache = stager.dev.info.node_cache("n1")
    try:
        # Released at the first ticks after the lease grace (20 s), not retried forever.
        doc = stager.wait_doc(
            job, "released", lambda d: d["staging"].get("n1") == "released", timeout=60
        )
        assert not (cache / "jobs" / str(job)).exists()
        # The links stayed where the agent put them (sticky directories of its own).
        assert "NOT-MOVED" in out and "NOT-LINKED" in out, out
        # The lease ended: no link to the job's objects is left anywhere.
        links = {
            p.stat().st_ino: p.stat().st_nlink
            for p in (cache / "objects").rglob("*")
            if p.is_file() and p.stat().st_ino in inodes
        }
        assert links == dict.fromkeys(inodes, 1), links
        # What alice made undeletable is set aside, shown to admins, and logged once.
        left = stager.client.get("/api/v1/nodes/n1/cache")["leftovers"]
        mine = [name for name in left if name.startswith(f"{job}.")]
        assert len(mine) == 1, left
        assert any(
            "view released" in e["message"] and f"released/{mine[0]}" in e["message"]
            for e in doc["events"]
        ), doc["events"]
        assert f"release of {job} " not in stager.log.read_text()
    finally:  # as root, as an admin would
        shutil.rmtree(cache / "jobs" / str(job), ignore_errors=True)
        for leftover in (cache / "released").glob(f"{job}.*"):
            shutil.rmtree(leftover)


def test_a_reused_job_id_is_staged_as_the_new_job_not_refused_as_the_old_ones(
    stager: Stager,
) -> None:
    # Slurm gives ids again after its counter wraps or its state is reset: bob's job that had
    # the next id ended long ago. (Recorded as a daemon of before submit times were kept
    # would have it: no submit time, first seen a day ago.)
    probe = stager.submit("alice", "#!/bin/bash\ntrue\n", "--hold")
    proc.run(["scancel", str(probe)], env=stager.dev.client_env())
    old_id = probe + 1
    state = Path(stager.dev.info.base) / "daemon" / "state.db"
    day_ago = time.time() - 86400
    with contextlib.closing(sqlite3.connect(state)) as conn, conn:
        conn.execute(
            "INSERT INTO jobs (kind, slurm_job_id, name, user, account, partition, state,"
            " state_reason, priority, planned_nodes, nodes, batch_host, directive_source,"
            " error, first_seen, ended_at, released_at) VALUES ('job', ?, 'old', 'bob', 'bio',"
            " 'debug', 'COMPLETED', '', 0, '', 'n2', 'n2', 'admin_comment', '', ?, ?, ?)",
            (old_id, day_ago, day_ago + 60, day_ago + 120),
        )
    src = chem_dataset(stager, count=2)
    script = (
        f'#!/bin/bash\n#HPCSTAGE --stage-in={src}:data\neval "$(hpcstage env)"\n'
        'echo "RAN $(ls "$HPCSTAGE_DIR/data" | wc -l)"\n'
    )
    job = stager.submit("alice", script, "--account=chem")
    assert job == old_id
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
    assert "RAN 2" in stager.output("alice", job)
    mine = json.loads(stager.cli("alice", "status", str(job), "--json").stdout)
    assert (mine["user"], mine["job_id"]) == ("alice", job)


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
