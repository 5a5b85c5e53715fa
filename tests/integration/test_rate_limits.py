"""Store rate limits on the real cluster (docs/configuration.md, "Rate limits"): a node's
bandwidth down and up, a node's request rate, and a site's bandwidth shared by two nodes
staging at once.

Only lower bounds are asserted (a busy machine may be slower, never faster): moving ``B``
bytes at a rate ``R`` with a burst of one second takes at least ``(B - R * 1 s) / R``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devcluster.cluster import DevCluster

from .staging import CHECKSUM_JOB, Stager, make_dataset, parse_sums, running_stager, small_files

pytestmark = pytest.mark.integration

MIB = 2**20
NODE_RATE = 4 * MIB  # bytes/s per node (low: unlimited, this machine moves 40 MiB in ~4 s)
SITE_RATE = 4 * MIB  # bytes/s for all nodes together
UPLOAD_RATE = 4 * MIB  # bytes/s per node
REQUEST_RATE = 50  # requests/s per node
BURST_SECONDS = 1.0  # hpcstage.core.ratelimit.BURST_SECONDS


def _with_limits(text: str) -> str:
    assert text.count("[transfer]\n") == 1
    limits = (
        f"node_download_rate = {NODE_RATE}\n"
        f"site_download_rate = {SITE_RATE}\n"
        f"node_request_rate = {REQUEST_RATE}\n"
        f"node_upload_rate = {UPLOAD_RATE}\n"
        # Objects of 8 MiB and more come in ranged parts (the lean ranged GET's threads);
        # smaller ones in one streamed GET: both paths are paced.
        'part_size = "5MiB"\nmultipart_threshold = "8MiB"\n'
        "peer_copy = false\n"
    )
    return text.replace("[transfer]\n", "[transfer]\n" + limits)


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "ratelimits", edit=_with_limits, concurrency=8)


def _noise(count: int, size: int, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}o{i:03d}.bin": os.urandom(size) for i in range(count)}


def _staged(stager: Stager, node: str, files: dict[str, bytes], job_name: str) -> dict[str, Any]:
    """Submit a job on ``node`` that checksums ``files`` staged in; its staging's record once
    the job has read them, byte for byte."""
    src, sums = make_dataset(stager.dev, files)
    job = _submit(stager, node, src, job_name)
    return _finished(stager, node, job, sums)


def _submit(stager: Stager, node: str, src: str, job_name: str) -> tuple[int, str]:
    dest = src.rstrip("/").rsplit("/", 1)[1]
    script = CHECKSUM_JOB.format(src=src, dest=dest)
    return stager.submit("alice", script, f"--nodelist={node}", f"--job-name={job_name}"), dest


def _finished(
    stager: Stager, node: str, submitted: tuple[int, str], sums: dict[str, str]
) -> dict[str, Any]:
    job = submitted[0]
    assert stager.dev.wait_job(job, timeout=600) == "COMPLETED", stager.output("alice", job)
    out = stager.output("alice", job)
    assert parse_sums(out) == sums, out  # every byte as in the store
    record: dict[str, Any] = stager.doc(job)["requests"][0]["nodes"][node]
    assert record["state"] in ("ready", "released"), record
    return record


def _seconds(*records: dict[str, Any]) -> float:
    return max(r["finished_at"] for r in records) - min(r["started_at"] for r in records)


def test_a_node_bandwidth_limit_holds_a_stage_in_to_its_rate(stager: Stager) -> None:
    # 40 MiB: two objects in ranged parts, four streamed whole.
    files = {**_noise(2, 12 * MIB, "big-"), **_noise(4, 4 * MIB, "mid-")}
    total = sum(len(b) for b in files.values())
    record = _staged(stager, "n1", files, "rate-bw")
    assert record["bytes_done"] == total
    least = (total - NODE_RATE * BURST_SECONDS) / NODE_RATE  # 9 s
    assert _seconds(record) >= least, record


def test_a_request_rate_limit_holds_many_small_objects_to_it(stager: Stager) -> None:
    files = small_files(300, size=1024)
    record = _staged(stager, "n2", files, "rate-req")
    # At least one GET per object (and a listing): 300 requests at 50/s after a burst of 50.
    least = (len(files) - REQUEST_RATE * BURST_SECONDS) / REQUEST_RATE  # 5 s
    assert _seconds(record) >= least, record


TWO_NODE_JOB = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --job-name=rate-site
#HPCSTAGE --stage-in={src}:data
srun --nodes=2 --ntasks=2 bash -c '
    eval "$(hpcstage env)" || exit 1
    cd "$HPCSTAGE_DIR/data" && find . -type f | sort | xargs sha256sum |
        sed "s/^/$SLURMD_NODENAME /"
'
"""


def test_a_site_bandwidth_limit_is_shared_by_two_nodes_staging_at_once(stager: Stager) -> None:
    # One two-node job: its input is staged on both nodes at once (peer copy is off), 32 MiB
    # each. Each at its own limit, they would take 7 s (about 11 s here, with what a stage
    # costs besides); sharing the site's 4 MiB/s, the 64 MiB take at least
    # (64 MiB - a burst of 4 MiB per node) / 4 MiB/s = 14 s.
    files = _noise(8, 4 * MIB)
    src, sums = make_dataset(stager.dev, files)
    job = stager.submit("alice", TWO_NODE_JOB.format(src=src), "--nodelist=n1,n2")
    assert stager.dev.wait_job(job, timeout=600) == "COMPLETED", stager.output("alice", job)
    seen: dict[str, dict[str, str]] = {}
    for line in stager.output("alice", job).splitlines():
        parts = line.split()  # "NODE SHA256 ./PATH"; other lines are hpcstage env's
        if len(parts) == 3 and len(parts[1]) == 64:
            seen.setdefault(parts[0], {})[parts[2].removeprefix("./")] = parts[1]
    assert seen == {"n1": sums, "n2": sums}  # every byte as in the store, on both nodes
    records = stager.doc(job)["requests"][0]["nodes"]
    assert sorted(records) == ["n1", "n2"], records
    both = list(records.values())
    # They did overlap: the second started before the first finished.
    assert max(r["started_at"] for r in both) < min(r["finished_at"] for r in both), both
    least = (len(records) * sum(map(len, files.values())) - 2 * SITE_RATE * BURST_SECONDS) / (
        SITE_RATE
    )
    assert _seconds(*both) >= least, both


UPLOAD_JOB = """#!/bin/bash
#HPCSTAGE --stage-out=out:s3://results/{run}/
eval "$(hpcstage env)"
mkdir -p "$HPCSTAGE_DIR/out"
for i in 0 1 2 3 4 5; do head -c {size} /dev/urandom > "$HPCSTAGE_DIR/out/o$i.bin"; done
cd "$HPCSTAGE_DIR/out" && sha256sum o*.bin
"""


def _stored(stager: Stager, prefix: str) -> dict[str, str]:
    """SHA-256 of each object under ``prefix`` of s3://results, by its name."""

    async def read() -> dict[str, str]:
        found: dict[str, str] = {}
        async with stager.dev.s3_client() as s3:
            listing = await s3.list_objects_v2(Bucket="results", Prefix=prefix)
            for item in listing.get("Contents", []):
                answer = await s3.get_object(Bucket="results", Key=item["Key"])
                async with answer["Body"] as body:
                    digest = hashlib.sha256(await body.read()).hexdigest()
                found[item["Key"][len(prefix) :]] = digest
        return found

    return asyncio.run(read())


def test_a_node_upload_limit_holds_a_stage_out_to_its_rate(stager: Stager) -> None:
    run, size = f"rate-{uuid.uuid4().hex[:8]}", 4 * MIB  # six objects: 24 MiB
    job = stager.submit("alice", UPLOAD_JOB.format(run=run, size=size), "--nodelist=n3")
    assert stager.dev.wait_job(job, timeout=300) == "COMPLETED", stager.output("alice", job)
    doc = stager.wait_doc(job, "staged out", lambda d: d["stage_out"] in ("done", "failed"), 600)
    assert doc["stage_out"] == "done", doc
    assert _stored(stager, f"{run}/") == parse_sums(stager.output("alice", job))
    out = next(r for r in doc["requests"] if r["direction"] == "out")
    record = out["nodes"]["n3"]
    least = (6 * size - UPLOAD_RATE * BURST_SECONDS) / UPLOAD_RATE  # 5 s
    assert _seconds(record) >= least, record
