"""Packed stage-out on the real dev cluster: a job's many small outputs become one version of
a packed dataset in a few PUTs, byte-exact; a second job makes the next version and the first
stays readable; symlinks and FIFOs are skipped as in an ordinary stage-out."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devcluster.cluster import DevCluster
from hpcstage.packed.dataset import PackedDataset
from hpcstage.store.s3 import S3Store

from .staging import Stager, running_stager, wait_until
from .test_stageout import BUCKET, md5s_from_output, s3_objects, wait_stage_out, writer_job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "packout", concurrency=8, lease_grace="5s")


def _dataset_md5s(dev: DevCluster, prefix: str, version: int) -> dict[str, str]:
    """path -> MD5 of every file of ``version``, read back through PackedDataset."""

    async def run() -> dict[str, str]:
        info = dev.info
        credentials = {"access_key": info.s3_access_key, "secret_key": info.s3_secret_key}
        async with S3Store(info.s3_endpoint, BUCKET, credentials=credentials) as store:
            dataset = PackedDataset(store, prefix)
            record = await dataset.record(version)
            members = [m async for batch in dataset.select(record, "") for m in batch]
            found: dict[str, str] = {}
            for name in sorted({m.segment for m in members}):
                ref = await dataset.segment_ref(record, name)
                mine = [m for m in members if m.segment == name]
                for member, data in zip(mine, await dataset.read_members(ref, mine), strict=True):
                    found[member.path] = hashlib.md5(data).hexdigest()  # noqa: S324
            return found

    return asyncio.run(run())


def _files(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f["path"]: f for r in doc["requests"] for st in r["nodes"].values() for f in st["files"]
    }


BODY = """\
for d in $(seq 20); do mkdir -p "set$d/sub"; for i in $(seq 50); do
  echo "set $d file $i $RANDOM" > "set$d/r$i.txt"; echo "$d.$i" > "set$d/sub/s$i"; done; done
head -c 25165824 /dev/urandom > big.bin
"""


def test_a_job_s_outputs_become_a_packed_version_in_few_puts(stager: Stager) -> None:
    prefix = f"packed-{uuid.uuid4().hex[:8]}/run.hpack/"
    dest = f"s3://{BUCKET}/{prefix}:pack"
    hostile = "ln -s /etc/passwd passwd; mkfifo pipe"
    first = stager.submit("alice", writer_job(dest, BODY + hostile), "--nodelist=n1")
    assert stager.dev.wait_job(first, timeout=180) == "COMPLETED", stager.output("alice", first)
    doc = wait_stage_out(stager, first, timeout=240)
    assert doc["stage_out"] == "done", doc
    local = md5s_from_output(stager.output("alice", first))
    assert len(local) == 2001
    assert _dataset_md5s(stager.dev, prefix, 1) == local
    # A few PUTs: the segments (256 MiB each), one manifest, one record; not 2001 objects.
    objects = s3_objects(stager.dev, prefix)
    assert len(objects) <= 4, sorted(objects)
    assert f"{prefix}versions/00000001.json" in objects
    # The symlink and the FIFO were skipped, as in an ordinary stage-out.
    files = _files(doc)
    assert files["out/passwd"]["state"] == "skipped" and files["out/pipe"]["state"] == "skipped"
    assert files["out/big.bin"]["key"] == f"{prefix[:-1]}@1/big.bin"
    assert files["out/big.bin"]["state"] == "uploaded"
    events = [e["message"] for e in doc["events"]]
    assert any(f"packed as s3://{BUCKET}/{prefix[:-1]}@1/" in m for m in events), events

    # A second job writing to the same dataset makes version 2; version 1 still reads.
    second = stager.submit("alice", writer_job(dest, "echo again > only.txt"), "--nodelist=n2")
    assert stager.dev.wait_job(second, timeout=180) == "COMPLETED"
    assert wait_stage_out(stager, second)["stage_out"] == "done"
    assert _dataset_md5s(stager.dev, prefix, 2) == md5s_from_output(stager.output("alice", second))
    assert _dataset_md5s(stager.dev, prefix, 1) == local
    text = stager.cli("alice", "status", str(second)).stdout
    assert f"{prefix[:-1]}@2/" in text, text


def test_a_loose_stage_out_into_a_dataset_is_refused_at_submission(stager: Stager) -> None:
    prefix = f"packed-{uuid.uuid4().hex[:8]}/run.hpack/"
    job = stager.submit("alice", writer_job(f"s3://{BUCKET}/{prefix}", "echo x > x"))
    doc = stager.wait_doc(job, "refused", lambda d: bool(d["error"]), 60)
    assert "add the flag ':pack'" in doc["error"], doc
    assert s3_objects(stager.dev, prefix) == {}


def test_daemon_killed_after_the_record_before_it_heard_makes_no_second_version(
    stager: Stager,
) -> None:
    prefix = f"packed-{uuid.uuid4().hex[:8]}/kill.hpack/"
    # big.bin (576 MiB): three segments, seconds of packing to stop the daemon in (with 288 MiB
    # a fast machine wrote the record before the daemon could be stopped).
    body = BODY.replace("25165824", "603979776")
    job = stager.submit("alice", writer_job(f"s3://{BUCKET}/{prefix}:pack", body), "-w", "n3")
    assert stager.dev.wait_job(job, timeout=180) == "COMPLETED"
    record = f"{prefix}versions/00000001.json"
    # The agent has begun to pack (its spool directory on the node): seconds before it writes
    # the record, however fast the machine. Looked for on the node's disk, not in the store.
    uploads = stager.dev.info.node_cache("n3") / "uploads" / str(job)
    deadline = time.monotonic() + 180
    while not (uploads.is_dir() and any(uploads.glob("pack-*"))):
        assert time.monotonic() < deadline, "the packed stage-out never started"
        time.sleep(0.02)
    # The agent is packing: the daemon is frozen, so it never hears that the record was written.
    os.kill(stager.pid, signal.SIGSTOP)
    try:
        assert record not in s3_objects(stager.dev, prefix), "stopped too late: nothing to test"
        wait_until("the record", lambda: record in s3_objects(stager.dev, prefix), 120, None)
    finally:
        stager.stop(hard=True)
    stager.start()
    doc = wait_stage_out(stager, job, timeout=240)
    assert doc["stage_out"] == "done", doc
    # The stage-out ran again and found its version: no second one, nothing uploaded twice.
    assert [k for k in s3_objects(stager.dev, prefix) if "/versions/" in k] == [record]
    assert {f["state"] for f in _files(doc).values()} == {"present"}
    local = md5s_from_output(stager.output("alice", job))
    assert _dataset_md5s(stager.dev, prefix, 1) == local
