"""Staging packed datasets on the real dev cluster (docs/packed-datasets.md, "Staging a packed
dataset"): a job sees exactly the selected subtree, byte-exact; a second job on the node
attaches without fetching; another user cannot read the tree; a corrupt segment is refused
naming it; kill -9 of the agent mid-stage is resumed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import proc
from devcluster.cluster import DevCluster
from hpcstage.core.packed import segment_key, segment_name
from hpcstage.packed.manifest import Member
from hpcstage.packed.segments import SegmentWriter
from hpcstage.packed.writer import VersionWriter
from hpcstage.store.s3 import S3Store

from .staging import Stager, busy, fetched_on, parse_sums, running_stager, wait_until

pytestmark = pytest.mark.integration

ROW_GROUP = 1024  # rows per manifest row group: a stage makes a GET per segment of each

JOB = """#!/bin/bash
#HPCSTAGE --stage-in={src}
eval "$(hpcstage env)"
echo "node=$SLURMD_NODENAME dir=$HPCSTAGE_DIR"
cd "$HPCSTAGE_DIR/{dest}" && find . -type f | sort | xargs sha256sum
echo "listed"
sleep {sleep}
"""


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "packed", concurrency=8)


@pytest.fixture(autouse=True)
def _clean_jobs(stager: Stager) -> Iterator[None]:
    yield
    stager.cancel_all()


def _files(count: int, size: int, subtrees: int = 3) -> dict[str, bytes]:
    return {f"set{i % subtrees}/d{i % 4}/f{i:05d}.dat": os.urandom(size) for i in range(count)}


def _pack(dev: DevCluster, files: dict[str, bytes], per_segment: int) -> tuple[str, list[str]]:
    """Version 1 of a new dataset in s3://datasets: its s3:// URL and its segments' names."""
    name = f"lib-{uuid.uuid4().hex[:8]}.hpack"
    info = dev.info
    credentials = {"access_key": info.s3_access_key, "secret_key": info.s3_secret_key}

    async def write(work: Path) -> list[str]:
        store = S3Store(info.s3_endpoint, "datasets", credentials=credentials)
        try:
            writer = VersionWriter(store, f"{name}/", 1, work, row_group=ROW_GROUP)
            members: list[Member] = []
            names, paths = [], sorted(files)
            for seq, start in enumerate(range(0, len(paths), per_segment)):
                names.append(segment_name(1, 0, seq))
                seg = SegmentWriter(work / f"s{seq}", names[-1])
                for path in paths[start : start + per_segment]:
                    members.append(seg.add(path, files[path], 0o644, 1_700_000_000 * 10**9))
                await writer.upload_segment(seg.finish())
            await writer.commit([members])
            return names
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as work:
        segments = asyncio.run(write(Path(work)))
    return f"s3://datasets/{name}/", segments


def _sums(files: dict[str, bytes], subtree: str) -> dict[str, str]:
    return {
        p[len(subtree) :]: hashlib.sha256(d).hexdigest()
        for p, d in files.items()
        if p.startswith(subtree)
    }


def _trees(dev: DevCluster, node: str) -> list[tuple[str, int, str]]:
    with contextlib.closing(sqlite3.connect(dev.info.node_cache(node) / "index.db")) as db:
        return list(db.execute("SELECT tree_id, files, dataset FROM trees"))


def _put(dev: DevCluster, key: str, body: bytes) -> None:
    async def put() -> None:
        async with dev.s3_client() as s3:
            await s3.put_object(Bucket="datasets", Key=key, Body=body)

    asyncio.run(put())


def _get(dev: DevCluster, key: str) -> bytes:
    async def get() -> bytes:
        async with dev.s3_client() as s3:
            answer = await s3.get_object(Bucket="datasets", Key=key)
            async with answer["Body"] as body:
                return bytes(await body.read())

    return asyncio.run(get())


def test_a_subtree_is_staged_exactly_attached_again_and_private(stager: Stager) -> None:
    dev = stager.dev
    files = _files(1500, 2048)
    src, _ = _pack(dev, files, per_segment=300)
    want = _sums(files, "set1/")
    earlier = set(_trees(dev, "n1"))  # other tests' datasets on n1 (the cluster is shared)
    first = stager.submit(
        "alice", JOB.format(src=src + "set1/:ligands", dest="ligands", sleep=0), "--nodelist=n1"
    )
    assert dev.wait_job(first, timeout=180) == "COMPLETED", stager.output("alice", first)
    assert parse_sums(stager.output("alice", first)) == want
    doc = stager.doc(first)
    # The version was pinned once, before staging: the request now names @1.
    assert doc["requests"][0]["src"] == src.rstrip("/") + "@1/set1/", doc["requests"]
    assert fetched_on(doc, "n1") > 0
    (tree,) = set(_trees(dev, "n1")) - earlier
    assert tree[1] == len(want)
    root = dev.info.node_cache("n1") / "packed" / tree[0] / "root"
    sample = root / sorted(want)[0]
    before = os.stat(sample)

    # A second job on the node attaches the tree: nothing fetched, no file touched.
    second = stager.submit(
        "alice", JOB.format(src=src + "set1/:ligands", dest="ligands", sleep=30), "--nodelist=n1"
    )
    wait_until(
        "the second job to list its inputs",
        lambda: "listed" in _output(stager, second),
        180,
        stager.log,
    )
    assert parse_sums(stager.output("alice", second)) == want
    assert fetched_on(stager.doc(second), "n1") == 0
    assert os.stat(sample).st_ctime_ns == before.st_ctime_ns
    assert set(_trees(dev, "n1")) - earlier == {tree}  # attached: no second tree
    # Another user reads neither the tree nor the job's view of it; the job's user can.
    view = dev.info.node_cache("n1") / "jobs" / str(second) / "ligands"
    for path in (sample, view / sorted(want)[0]):
        theirs = dev.run_as("bob", ["cat", str(path)], check=False)
        assert theirs.returncode != 0 and "Permission denied" in theirs.stderr, theirs
    listing = dev.run_as("bob", ["ls", str(root.parent.parent)], check=False)
    assert listing.returncode != 0 and "Permission denied" in listing.stderr
    mine = dev.run_as("alice", ["cat", str(sample)], check=False)
    assert mine.returncode == 0, mine.stderr
    proc.run(["scancel", str(second)], env=dev.client_env())
    stager.wait_doc(second, "released", lambda d: d["staging"].get("n1") == "released", 120)
    wait_until(
        "alice's ACL entry to go with her last job",
        lambda: dev.run_as("alice", ["cat", str(sample)], check=False).returncode != 0,
        60,
        stager.log,
    )


def test_a_corrupt_segment_is_refused_naming_it_and_a_restored_one_is_staged(
    stager: Stager,
) -> None:
    dev = stager.dev
    files = _files(600, 1024)
    src, segments = _pack(dev, files, per_segment=200)
    key = src.removeprefix("s3://datasets/") + segment_key(segments[1])
    good = _get(dev, key)
    evil = bytearray(good)
    evil[len(good) // 2 : len(good) // 2 + 64] = os.urandom(64)  # same size, bytes changed
    _put(dev, key, bytes(evil))
    job = stager.submit("alice", JOB.format(src=src, dest=_name(src), sleep=0), "--nodelist=n2")
    assert dev.wait_job(job, timeout=180) == "FAILED", stager.output("alice", job)
    error = stager.doc(job)["requests"][0]["nodes"]["n2"]["error"]
    assert f"corrupt segment {segments[1]} of {src}" in error, error
    assert not [t for t in _trees(dev, "n2") if t[2] == src]

    _put(dev, key, good)
    job = stager.submit("alice", JOB.format(src=src, dest=_name(src), sleep=0), "--nodelist=n2")
    assert dev.wait_job(job, timeout=180) == "COMPLETED", stager.output("alice", job)
    assert parse_sums(stager.output("alice", job)) == _sums(files, "")


def test_kill_9_of_the_agent_mid_stage_resumes_the_build(stager: Stager) -> None:
    dev = stager.dev
    files = _files(20_000, 4096, subtrees=2)
    src, _ = _pack(dev, files, per_segment=2500)
    hold = busy(stager, "n3", 600, limit_min=15)
    job = stager.submit("alice", JOB.format(src=src, dest=_name(src), sleep=0), "--nodelist=n3")
    packed = dev.info.node_cache("n3") / "packed"
    wait_until("a tree half built on n3", lambda: _journaled(packed) >= 1, 180, stager.log)
    pids = _agent_pids(dev, "n3")
    assert pids
    os.kill(pids[0], signal.SIGKILL)
    wait_until("the n3 agent to be gone", lambda: pids[0] not in _agent_pids(dev, "n3"), 30, None)
    assert all(t[2] != src for t in _trees(dev, "n3"))
    done = _journaled(packed)
    doc = stager.wait_doc(job, "staged again", lambda d: d["staging"].get("n3") == "ready", 300)
    # Resumed, not started over: the GETs whose files were written before the kill (as the
    # temp tree's journal says) were not made again. A GET per segment of each row group.
    gets = len({(i // ROW_GROUP, i // 2500) for i in range(20_000)})
    assert fetched_on(doc, "n3") == gets - done, (gets, done, doc["requests"])
    assert not [n for n in os.listdir(packed) if ".tmp-" in n]
    proc.run(["scancel", str(hold)], env=dev.client_env())
    assert dev.wait_job(job, timeout=240) == "COMPLETED"
    assert parse_sums(stager.output("alice", job)) == _sums(files, "")


def _journaled(packed: Path) -> int:
    """GETs whose files a temp tree on the node holds (its journal's lines but the first)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(packed):
            if ".tmp-" in name:
                return len((packed / name / "journal").read_text().splitlines()[1:])
    return 0


def _agent_pids(dev: DevCluster, node: str) -> list[int]:
    out = proc.run(
        ["pgrep", "-f", f"agent --node {node} --cache-dir {dev.info.base}/"], check=False
    ).stdout
    return [int(p) for p in out.split()]


def _name(src: str) -> str:
    return src.rstrip("/").rsplit("/", 1)[1].removesuffix(".hpack")


def _output(stager: Stager, job: int) -> str:
    try:
        return stager.output("alice", job)
    except FileNotFoundError:
        return ""


def test_a_warmup_materialises_the_tree_that_a_job_then_attaches(stager: Stager) -> None:
    dev = stager.dev
    files = _files(900, 512)
    src, _ = _pack(dev, files, per_segment=300)
    done = stager.cli("alice", "warmup", src + "set2/", "--nodes", "n2", "--json")
    assert json.loads(done.stdout)["staging"]["n2"] in ("ready", "released"), done.stdout
    row = json.loads(stager.cli("alice", "cache", "ls", "n2", "--json").stdout)
    # The warmup's tree is held by no job (an earlier test's job on n2 may still hold its own
    # tree until its release: a fresh clone's run saw trees 2, leased 1).
    assert row["usage"]["trees"] > row["usage"]["leased_trees"], row["usage"]
    assert "packed trees:" in stager.cli("alice", "cache", "ls", "n2").stdout
    job = stager.submit(
        "alice", JOB.format(src=src + "set2/", dest="set2", sleep=0), "--nodelist=n2"
    )
    assert dev.wait_job(job, timeout=180) == "COMPLETED", stager.output("alice", job)
    assert parse_sums(stager.output("alice", job)) == _sums(files, "set2/")
    assert fetched_on(stager.doc(job), "n2") == 0  # the warmup's tree, attached
