"""The cache cluster and peer copy with a real Slurm job: a held job's inputs wait on the
cache node, and the node the job finally runs on copies them from there, not from S3."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from devcluster import proc
from devcluster.cluster import DevCluster

from .staging import (
    CHECKSUM_JOB,
    Stager,
    fetched_on,
    make_dataset,
    parse_sums,
    running_stager,
    small_files,
)

pytestmark = pytest.mark.integration

CACHE_NODE = "n3"


def _with_cache_cluster(text: str) -> str:
    assert text.count("[cache]\n") == 1
    return text.replace("[cache]\n", f'[cache]\ncluster_nodes = ["{CACHE_NODE}"]\n')


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "cachecluster", edit=_with_cache_cluster, concurrency=8)


def test_a_held_job_waits_on_the_cache_node_and_its_node_copies_from_there(
    stager: Stager,
) -> None:
    files = small_files(40, size=2048)
    src, sums = make_dataset(stager.dev, files)
    dest = src.rstrip("/").rsplit("/", 1)[1]
    script = CHECKSUM_JOB.format(src=src, dest=dest)
    # Held: the backfill scheduler plans no nodes for it, so only the cache cluster can help.
    job = stager.submit("alice", script, "--hold", "--nodelist=n1", "--account=chem")
    doc = stager.wait_doc(
        job,
        "staged on the cache node while held",
        lambda d: d["staging"].get(CACHE_NODE) == "ready",
    )
    assert doc["state"] == "PENDING" and not doc["planned_nodes"], doc
    assert fetched_on(doc, CACHE_NODE) == len(files)
    assert "held on the cache cluster" in str(doc["events"])

    proc.run(["scontrol", "release", str(job)], env=stager.dev.client_env())
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
    out = stager.output("alice", job)
    assert "node=n1" in out
    assert parse_sums(out) == sums, out
    doc = stager.doc(job)
    # n1 asked S3 for nothing: every object came from the cache node, verified.
    assert fetched_on(doc, "n1") == 0, doc
    events = str(doc["events"])
    assert f"copied {len(files)} objects" in events and f"from {CACHE_NODE}'s cache" in events
    # The cache node's view (its lease) was let go once the job had its node.
    assert doc["staging"].get(CACHE_NODE) == "released", doc


def _stats(stager: Stager, node: str) -> dict[str, int]:
    stats: dict[str, int] = json.loads(stager.cli("alice", "cache", "ls", node, "--json").stdout)[
        "stats"
    ]
    return stats


def test_a_shard_of_hundreds_of_files_is_copied_from_a_peer_in_full(stager: Stager) -> None:
    """Issue 18: a peer copy of a real shard (700 files) moves batches of 4 MiB, one reply of
    5.4 MiB each: more than the SSH channel's window. It once failed ("not JSON"), killed
    both sessions and fetched every file from the store again."""
    files = small_files(700, size=8192)
    src, _ = make_dataset(stager.dev, files)
    stager.cli("alice", "warmup", src, "--nodes", "n2", "--json")
    before = _stats(stager, "n1")

    doc = json.loads(stager.cli("alice", "warmup", src, "--nodes", "n1", "--json").stdout)

    after = _stats(stager, "n1")
    assert after["peer_objects"] - before["peer_objects"] == len(files), doc["events"]
    assert after["fetched_objects"] - before["fetched_objects"] == 0
    st = doc["requests"][0]["nodes"]["n1"]
    assert (st["peer_files"], st["fetched_files"]) == (len(files), 0), st
    assert f"copied {len(files)} objects" in json.dumps(doc["events"])
