"""Stage-out after the job, on the real dev cluster: verified, exactly once, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster import proc
from devcluster.cluster import DevCluster

from .staging import Stager, fetched_on, parse_sums, running_stager, wait_until

pytestmark = pytest.mark.integration

BUCKET = "results"


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "stageout", concurrency=8, lease_grace="5s")


def writer_job(dest: str, body: str, extra: str = "") -> str:
    """A job that writes outputs under $HPCSTAGE_DIR/out and prints their MD5 sums."""
    return f"""#!/bin/bash
#HPCSTAGE --stage-out=out:{dest}
{extra}
set -e
eval "$(hpcstage env)"
mkdir -p "$HPCSTAGE_DIR/out"
cd "$HPCSTAGE_DIR/out"
{body}
find . -type f | sort | xargs md5sum
"""


def s3_objects(dev: DevCluster, prefix: str) -> dict[str, tuple[str, int]]:
    """key -> (ETag without quotes, size) under ``prefix`` in the results bucket."""

    async def run() -> dict[str, tuple[str, int]]:
        found: dict[str, tuple[str, int]] = {}
        async with dev.s3_client() as s3:
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
                for obj in page.get("Contents", []):
                    found[obj["Key"]] = (obj["ETag"].strip('"'), obj["Size"])
        return found

    return asyncio.run(run())


def s3_call(dev: DevCluster, method: str, **kw: Any) -> Any:
    async def run() -> Any:
        async with dev.s3_client() as s3:
            result = await getattr(s3, method)(**kw)
            if "Body" in result:
                return await result["Body"].read()
            return result

    return asyncio.run(run())


def open_uploads(dev: DevCluster, prefix: str) -> list[Any]:
    """ListMultipartUploads under ``prefix`` (rclone says NoSuchUpload when there are none)."""
    try:
        found = s3_call(dev, "list_multipart_uploads", Bucket=BUCKET, Prefix=prefix)
    except Exception as exc:
        if "NoSuchUpload" not in str(exc):
            raise
        return []
    return list(found.get("Uploads") or [])


def wait_stage_out(stager: Stager, job: int, timeout: float = 240) -> dict[str, Any]:
    return stager.wait_doc(
        job,
        "stage-out finished",
        lambda d: d["stage_out"] in ("done", "failed", "skipped"),
        timeout,
    )


def md5s_from_output(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 32:
            found[parts[1].removeprefix("./")] = parts[0]
    return found


def test_outputs_arrive_verified_and_the_node_copy_is_released_after(stager: Stager) -> None:
    prefix = f"run-{uuid.uuid4().hex[:8]}/"
    body = (
        'mkdir small; for i in $(seq 1000); do echo "result $i $RANDOM" > small/r$i.txt; done\n'
        "head -c 1073741824 /dev/urandom > big.bin"
    )
    job = stager.submit(
        "alice", writer_job(f"s3://{BUCKET}/{prefix}%j/", body), "--nodelist=n1", "--account=chem"
    )
    assert stager.dev.wait_job(job, timeout=180) == "COMPLETED", stager.output("alice", job)
    doc = wait_stage_out(stager, job, timeout=300)
    assert doc["stage_out"] == "done", doc
    local = md5s_from_output(stager.output("alice", job))
    assert len(local) == 1001
    stored = s3_objects(stager.dev, f"{prefix}{job}/")
    assert {k.removeprefix(f"{prefix}{job}/"): v[0] for k, v in stored.items()} == local
    # The job directory on the node was released only after every output was verified.
    events = [
        e["message"]
        for e in stager.wait_doc(
            job,
            "view released",
            lambda d: any("released" in e["message"] for e in d["events"]),
            timeout=60,
        )["events"]
    ]
    verified = next(i for i, m in enumerate(events) if m.startswith("stage-out verified"))
    released = next(i for i, m in enumerate(events) if "view released" in m)
    assert verified < released, events
    assert not (stager.dev.info.node_cache("n1") / "jobs" / str(job)).exists()


def test_daemon_killed_mid_upload_every_object_once_no_multipart_left(stager: Stager) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:8]}/"
    body = (
        "mkdir small; for i in $(seq 300); do head -c 65536 /dev/urandom > small/r$i; done\n"
        "for i in 1 2; do head -c 805306368 /dev/urandom > big$i.bin; done"
    )
    job = stager.submit("alice", writer_job(f"s3://{BUCKET}/{prefix}", body), "--nodelist=n2")
    assert stager.dev.wait_job(job, timeout=180) == "COMPLETED"
    stager.wait_doc(job, "stage-out under way", lambda d: _out_files_done(d) >= 20, timeout=120)
    stager.stop(hard=True)
    stager.start()
    doc = wait_stage_out(stager, job, timeout=300)
    assert doc["stage_out"] == "done", doc
    local = md5s_from_output(stager.output("alice", job))
    stored = s3_objects(stager.dev, prefix)
    assert {k.removeprefix(prefix): v[0] for k, v in stored.items()} == local
    # Exactly once: nothing was replaced (so nothing went to the recycle bin)...
    assert not any(f"/{job}~" in k for k in s3_objects(stager.dev, ".hpcstage-trash/"))
    # ...and no multipart upload was left behind.
    assert open_uploads(stager.dev, prefix) == []


def test_store_down_for_30s_stage_out_completes_by_itself(stager: Stager) -> None:
    prefix = f"down-{uuid.uuid4().hex[:8]}/"
    body = "for i in $(seq 50); do echo $i > f$i; done"
    job = stager.submit(
        "bob",
        writer_job(f"s3://{BUCKET}/{prefix}", body),
        "--account=bio",
        "--nodelist=n3",
        "--hold",
    )
    stager.dev.stop_s3()
    try:
        from devcluster import proc

        proc.run(["scontrol", "release", str(job)], env=stager.dev.client_env())
        assert stager.dev.wait_job(job, timeout=120) == "COMPLETED"
        stager.wait_doc(job, "stage-out retrying", lambda d: d["stage_out"] == "running", 60)
        time.sleep(30)
        assert stager.doc(job)["stage_out"] == "running"
    finally:
        stager.dev.start_s3()
    doc = wait_stage_out(stager, job, timeout=300)
    assert doc["stage_out"] == "done", doc
    assert len(s3_objects(stager.dev, prefix)) == 50


def test_overwrite_keeps_the_old_object_in_the_trash_and_restore_brings_it_back(
    stager: Stager,
) -> None:
    prefix = f"over-{uuid.uuid4().hex[:8]}/"
    old = b"the results of last month, which someone still needs\n"
    s3_call(stager.dev, "put_object", Bucket=BUCKET, Key=f"{prefix}table.csv", Body=old)
    job = stager.submit("alice", writer_job(f"s3://{BUCKET}/{prefix}", "echo new > table.csv"))
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED"
    doc = wait_stage_out(stager, job)
    files = [f for r in doc["requests"] for st in r["nodes"].values() for f in st["files"]]
    assert [f["state"] for f in files] == ["uploaded"]
    trash = files[0]["trash_key"]
    # <trash_prefix><day>/<job>~<ETag of the version kept>/<key>
    old_etag = hashlib.md5(old).hexdigest()  # noqa: S324 (rclone's ETag)
    assert trash.startswith(".hpcstage-trash/")
    assert trash.endswith(f"/{job}~{old_etag}/{prefix}table.csv"), trash
    assert s3_call(stager.dev, "get_object", Bucket=BUCKET, Key=trash) == old
    assert s3_call(stager.dev, "get_object", Bucket=BUCKET, Key=f"{prefix}table.csv") == b"new\n"
    listing = stager.cli("alice", "trash", "ls", BUCKET).stdout
    assert f"s3://{BUCKET}/{trash}" in listing
    restored = stager.cli("alice", "trash", "restore", f"s3://{BUCKET}/{trash}").stdout
    assert "restored" in restored and "now in the bin" in restored, restored
    assert s3_call(stager.dev, "get_object", Bucket=BUCKET, Key=f"{prefix}table.csv") == old


def test_trash_ls_follows_pages_and_shows_each_user_their_own_entries(stager: Stager) -> None:
    prefix = f"pages-{uuid.uuid4().hex[:8]}/"
    jobs = {}
    for user in ("alice", "bob"):
        script = writer_job(f"s3://{BUCKET}/{prefix}{user}/", "echo x > x")
        jobs[user] = stager.submit(user, script, *(["--account=bio"] if user == "bob" else []))
    for job in jobs.values():
        assert stager.dev.wait_job(job, timeout=120) == "COMPLETED"
        wait_stage_out(stager, job)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    planted = {
        user: {
            f".hpcstage-trash/{day}/{job}/{prefix}f{i}" for i in range(5 if user == "alice" else 3)
        }
        for user, job in jobs.items()
    }
    for keys in planted.values():
        for key in keys:
            s3_call(stager.dev, "put_object", Bucket=BUCKET, Key=key, Body=b"old")
    for user in ("alice", "bob"):
        # Pages of 2 keys: many requests, each entry once, someone else's never.
        out = stager.cli(user, "trash", "ls", BUCKET, "--page-size", "2", "--json").stdout
        listed = [e["trash_key"] for e in json.loads(out) if prefix in e["trash_key"]]
        assert sorted(listed) == sorted(planted[user]), out
    text = stager.cli("alice", "trash", "ls", "--page-size", "3").stdout  # every bucket
    assert sum(f"{prefix}f" in line and "restore:" in line for line in text.splitlines()) == 5


def test_trash_ls_takes_a_place_as_every_other_command_does(stager: Stager) -> None:
    """s3://bucket/prefix/ lists the entries whose original key is under the prefix; a place
    the daemon cannot use is a 4xx naming it, never a 500 (issue 19)."""
    prefix = f"place-{uuid.uuid4().hex[:8]}/"
    job = stager.submit("alice", writer_job(f"s3://{BUCKET}/{prefix}run1/", "echo x > x"))
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED"
    wait_stage_out(stager, job)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    inside = {f".hpcstage-trash/{day}/{job}/{prefix}run1/f{i}" for i in range(3)}
    outside = f".hpcstage-trash/{day}/{job}/{prefix}run2/f0"
    for key in (*inside, outside):
        s3_call(stager.dev, "put_object", Bucket=BUCKET, Key=key, Body=b"old")
    out = stager.cli("alice", "trash", "ls", f"s3://{BUCKET}/{prefix}run1/", "--json").stdout
    assert sorted(e["trash_key"] for e in json.loads(out)) == sorted(inside), out
    whole = stager.cli("alice", "trash", "ls", f"s3://{BUCKET}", "--json").stdout
    assert outside in {e["trash_key"] for e in json.loads(whole)}
    for bad in ("s3://", "s3://No_Such..Bucket/x", "http://results/x"):
        refused = stager.cli("alice", "trash", "ls", bad, check=False)
        assert refused.returncode != 0, refused
        assert "500" not in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert bad in refused.stderr or "bucket" in refused.stderr, refused.stderr


def test_symlinks_leaving_the_job_dir_and_special_files_are_not_uploaded(stager: Stager) -> None:
    prefix = f"links-{uuid.uuid4().hex[:8]}/"
    body = "echo fine > ok.txt; ln -s /etc/passwd passwd; mkfifo pipe"
    job = stager.submit("bob", writer_job(f"s3://{BUCKET}/{prefix}", body), "--account=bio")
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED"
    doc = wait_stage_out(stager, job)
    assert list(s3_objects(stager.dev, prefix)) == [f"{prefix}ok.txt"]
    files = {
        f["path"]: f for r in doc["requests"] for st in r["nodes"].values() for f in st["files"]
    }
    assert files["out/passwd"]["state"] == "skipped"
    assert "/etc/passwd" in files["out/passwd"]["error"]
    assert files["out/pipe"]["state"] == "skipped"
    status = stager.cli("bob", "status", str(job)).stdout
    assert "out/passwd: skipped" in status and "out/pipe: skipped" in status, status
    # The list of jobs says how each job's stage-out went.
    table = stager.cli("bob", "status", "--all", "--parsable").stdout.splitlines()
    header = table[0].split("|")
    row = next(line.split("|") for line in table if line.split("|")[:1] == [str(job)])
    assert row[header.index("STAGE-OUT")] == "done", table


def test_dependent_job_on_the_same_node_is_served_from_the_cache(stager: Stager) -> None:
    prefix = f"dep-{uuid.uuid4().hex[:8]}/"
    body = "for i in $(seq 40); do head -c 8192 /dev/urandom > part$i; done"
    first = stager.submit("alice", writer_job(f"s3://{BUCKET}/{prefix}", body), "--nodelist=n1")
    second = stager.submit(
        "alice",
        f"#!/bin/bash\n#HPCSTAGE --stage-in=s3://{BUCKET}/{prefix}:inputs/\n"
        'eval "$(hpcstage env)"\ncd "$HPCSTAGE_DIR/inputs" && find . -type f | sort | '
        "xargs sha256sum\n",
        "--nodelist=n1",
        f"--dependency=afterok:{first}",
    )
    assert stager.dev.wait_job(first, timeout=120) == "COMPLETED"
    # The dependent job may start as soon as the first ends; its `hpcstage env` waits for the
    # stage-out, whose verified outputs become cache entries on n1.
    assert stager.dev.wait_job(second, timeout=180) == "COMPLETED", stager.output("alice", second)
    sums = parse_sums(stager.output("alice", second))
    assert len(sums) == 40
    assert fetched_on(stager.doc(second), "n1") == 0  # no GET: all from n1's cache


def _out_files_done(doc: dict[str, Any]) -> int:
    return sum(
        st["files_done"]
        for r in doc["requests"]
        if r["direction"] == "out"
        for st in r["nodes"].values()
    )


def test_wait_until_helper_is_real() -> None:
    with pytest.raises(Exception, match="timed out"):
        wait_until("never", lambda: False, 0.3, None)


def test_a_symlinked_directory_in_the_source_path_is_refused(stager: Stager) -> None:
    prefix = f"parent-{uuid.uuid4().hex[:8]}/"
    script = f"""#!/bin/bash
#HPCSTAGE --stage-out=a/etc:s3://{BUCKET}/{prefix}
eval "$(hpcstage env)"
ln -s / "$HPCSTAGE_DIR/a"
"""
    job = stager.submit("bob", script, "--account=bio")
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED"
    doc = wait_stage_out(stager, job)
    assert doc["stage_out"] == "failed"
    errors = [st["error"] for r in doc["requests"] for st in r["nodes"].values() if st["error"]]
    assert any("symlinks are not followed" in e for e in errors), errors
    assert s3_objects(stager.dev, prefix) == {}  # nothing of /etc left the node


def test_a_retry_bins_the_version_written_since_and_aborts_no_one_elses_upload(
    stager: Stager,
) -> None:
    # The state a first attempt leaves when it copied O to the bin and then failed, after
    # which someone else wrote N to the key and started a multipart upload there: the retry
    # must put N in the bin too (not take the copy of O for it) and leave that upload alone.
    from devcluster import proc

    prefix = f"race-{uuid.uuid4().hex[:8]}/"
    key = f"{prefix}table.csv"
    s3_call(stager.dev, "put_object", Bucket=BUCKET, Key=key, Body=b"O\n")
    job = stager.submit(
        "alice", writer_job(f"s3://{BUCKET}/{prefix}", "echo mine > table.csv"), "--hold"
    )
    day = time.strftime("%Y-%m-%d", time.gmtime())
    first_attempt = f".hpcstage-trash/{day}/{job}/{key}"  # the copy's name before versions
    s3_call(stager.dev, "put_object", Bucket=BUCKET, Key=first_attempt, Body=b"O\n")
    s3_call(stager.dev, "put_object", Bucket=BUCKET, Key=key, Body=b"N\n")
    theirs = s3_call(stager.dev, "create_multipart_upload", Bucket=BUCKET, Key=key)["UploadId"]
    try:
        proc.run(["scontrol", "release", str(job)], env=stager.dev.client_env())
        assert stager.dev.wait_job(job, timeout=120) == "COMPLETED"
        assert wait_stage_out(stager, job)["stage_out"] == "done"
        assert s3_call(stager.dev, "get_object", Bucket=BUCKET, Key=key) == b"mine\n"
        binned = [
            s3_call(stager.dev, "get_object", Bucket=BUCKET, Key=k)
            for k in s3_objects(stager.dev, ".hpcstage-trash/")
            if k.endswith(f"/{key}") and (f"/{job}/" in k or f"/{job}~" in k)
        ]
        assert sorted(binned) == [b"N\n", b"O\n"]
        assert theirs in [u["UploadId"] for u in open_uploads(stager.dev, prefix)]
    finally:
        with contextlib.suppress(Exception):  # gone if the stage-out aborted it (the defect)
            s3_call(stager.dev, "abort_multipart_upload", Bucket=BUCKET, Key=key, UploadId=theirs)


def _staging_errors(doc: dict[str, Any]) -> list[str]:
    return [st["error"] for r in doc["requests"] for st in r["nodes"].values() if st["error"]]


def _files(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f["path"]: f for r in doc["requests"] for st in r["nodes"].values() for f in st["files"]
    }


def test_a_file_name_that_is_not_utf8_ends_the_stage_out_naming_it(stager: Stager) -> None:
    prefix = f"utf8-{uuid.uuid4().hex[:8]}/"
    body = "echo fine > ok.txt; echo kept > \"$(printf 'bad\\xff.txt')\"; echo two > z.txt"
    job = stager.submit("bob", writer_job(f"s3://{BUCKET}/{prefix}", body), "--account=bio")
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED"
    # It ends (before: an UnicodeEncodeError in the database was retried forever)...
    doc = wait_stage_out(stager, job, timeout=90)
    assert doc["stage_out"] == "failed", doc
    # ...saying which file, its bytes escaped, and uploading every other file.
    assert any("bad\\xff.txt" in e and "UTF-8" in e for e in _staging_errors(doc)), doc
    assert sorted(s3_objects(stager.dev, prefix)) == [f"{prefix}ok.txt", f"{prefix}z.txt"]
    bad = _files(doc)["out/bad\\xff.txt"]
    assert bad["state"] == "failed" and "UTF-8" in bad["error"], bad


SWAPPER = r"""
# As the job's user, from a shell that holds a directory inside the job's view as its cwd
# (a second job or a login on the node keeps it after the job ends and its ACL is revoked).
view=$1; swap=$2; mark=$3
cd "$view/out" || exit 1
touch "$mark.ready"
# The stage-out begins by revoking our access to the view; its walk of the directory takes
# milliseconds, its uploads seconds: swap what it listed in between.
while ls "$view" >/dev/null 2>&1; do sleep 0.01; done
sleep 0.5
eval "$swap"
touch "$mark.swapped"
"""


def _bodies(dev: DevCluster, keys: list[str]) -> dict[str, bytes]:
    async def run() -> dict[str, bytes]:
        async with dev.s3_client() as s3:
            sem = asyncio.Semaphore(16)

            async def get(key: str) -> tuple[str, bytes]:
                async with sem:
                    answer = await s3.get_object(Bucket=BUCKET, Key=key)
                    return key, await answer["Body"].read()

            return dict(await asyncio.gather(*(get(k) for k in keys)))

    return asyncio.run(run())


def _read_when_there(path: Path, timeout: float) -> str:
    wait_until(f"{path} written", path.exists, timeout, None)
    wait_until(f"{path} complete", lambda: path.read_text().endswith("\n"), 10, None)
    return path.read_text().strip()


def _victim_job(stager: Stager, tag: str) -> tuple[int, str]:
    """alice's running job with a directory of secrets: (job id, that directory)."""
    mark = stager.dev.workdir("alice") / f"victim-{tag}"
    job = stager.submit(
        "alice",
        f"""#!/bin/bash
#HPCSTAGE --stage-out=results:s3://{BUCKET}/victim-{tag}/:optional
eval "$(hpcstage env)"
mkdir -p "$HPCSTAGE_DIR/secret" && cd "$HPCSTAGE_DIR/secret"
for i in $(seq 1000); do echo "SECR $i" > f$i; done
echo "$HPCSTAGE_DIR" > {mark}
sleep 300
""",
        "--nodelist=n2",
        "--account=chem",
    )
    return job, _read_when_there(mark, 120) + "/secret"


@pytest.mark.parametrize(
    "swapped_in", ["a symlink to another user's job directory", "a symlink to the cache", "a FIFO"]
)
def test_outputs_swapped_during_the_stage_out_upload_nothing_else_and_never_block(
    stager: Stager, swapped_in: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"swap-{tag}/"
    victim, swap = 0, f"mv b b.real && ln -s {stager.dev.info.node_cache('n1')} b"
    if swapped_in == "a FIFO":
        swap = "rm b/f999 && mkfifo b/f999"  # nobody writes to it: a blocking open hangs
    elif swapped_in == "a symlink to another user's job directory":
        # Its files have the names and sizes of bob's: the old walk's checks all passed.
        # (It runs on n2: all dev nodes share this host, as jobs on one node share it.)
        victim, secrets = _victim_job(stager, tag)
        swap = f"mv b b.real && ln -s {secrets} b"
    mark = stager.dev.workdir("bob") / f"attack-{tag}"
    # f999 and index.db sort last: the uploads reach them after the swap.
    body = (
        'mkdir b; for i in $(seq 1000); do echo "mine $i" > b/f$i; done\n'
        "echo 'not the index' > b/index.db\n"
        f'echo "$HPCSTAGE_DIR" > {mark}\n'
        f"for i in $(seq 600); do [ -e {mark}.ready ] && break; sleep 0.1; done"
    )
    job = stager.submit(
        "bob", writer_job(f"s3://{BUCKET}/{prefix}", body), "--nodelist=n1", "--account=bio"
    )
    view = _read_when_there(mark, 120)
    swapper = subprocess.Popen(
        [
            "runuser",
            "-u",
            "bob",
            "--",
            "bash",
            "-c",
            SWAPPER,
            "swapper",
            view,
            swap,
            str(mark),
        ]
    )
    try:
        assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("bob", job)
        doc = wait_stage_out(stager, job, timeout=90)
        assert swapper.wait(timeout=60) == 0
    finally:
        if swapper.poll() is None:
            swapper.kill()
        if victim:
            proc.run(["scancel", str(victim)], env=stager.dev.client_env(), check=False)
    assert Path(f"{mark}.swapped").exists()  # the swap came while the stage-out ran
    stored = _bodies(stager.dev, sorted(s3_objects(stager.dev, prefix)))
    mine = (b"mine ", b"not the index")
    foreign = {k: v[:40] for k, v in stored.items() if not v.startswith(mine)}
    assert foreign == {}, f"{len(foreign)} objects not bob's: {sorted(foreign.items())[:5]}"
    # What could not be read safely any more is named, and failed the stage-out.
    failed = {p: f["error"] for p, f in _files(doc).items() if f["state"] == "failed"}
    assert all(p.startswith("out/b/") for p in failed), failed
    if swapped_in == "a FIFO":
        assert list(failed) == ["out/b/f999"], failed
        assert "not a regular file" in failed["out/b/f999"], failed
    else:  # (or "No such file" when it looked between the swapper's mv and ln)
        assert all("a directory on its path" in e for e in failed.values()), failed
    assert (doc["stage_out"] == "failed") == bool(failed), doc["stage_out"]
