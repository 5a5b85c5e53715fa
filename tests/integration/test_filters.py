"""Include/exclude filters on a stage-in prefix and preserved mtimes, on the real dev cluster:
a filtered-out object is never fetched (job stage-in, warmup, peer copy), a bad glob refuses
the job naming the directive, and staged files carry the store's Last-Modified.

Pinned object versions need a store that keeps versions (the dev cluster's rclone does not):
tests/integration/test_versions_cluster.py runs Slurm jobs against moto's server, and
tests/contract/test_versions.py stages them through the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from devcluster.cluster import DevCluster

from .staging import Stager, fetched_on, make_dataset, parse_sums, running_stager

pytestmark = pytest.mark.integration

# Under the prefix: what include=**/*.nc,exclude=tmp/** takes (3 files) and leaves (4).
TAKEN = ("a.nc", "d/b.nc", "d/e/c.nc")
LEFT = ("a.txt", "tmp/x.nc", "d/b.nc.part", "d/tmp.txt")
FILTER = "include=**/*.nc,exclude=tmp/**"


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "filters")


@pytest.fixture(autouse=True)
def _clean_jobs(stager: Stager) -> Iterator[None]:
    yield
    stager.cancel_all()


def _dataset(stager: Stager) -> tuple[str, dict[str, str]]:
    """A fresh prefix holding TAKEN and LEFT; its URL and the SHA-256 of each taken file."""
    files = {rel: f"{rel}\n".encode() * 100 for rel in (*TAKEN, *LEFT)}
    src, sums = make_dataset(stager.dev, files)
    return src, {rel: sums[rel] for rel in TAKEN}


def _last_modified(dev: DevCluster, src: str) -> dict[str, float]:
    """Each object's Last-Modified as the store lists it (seconds since the epoch; a listing
    gives milliseconds, a HEAD's HTTP date whole seconds)."""
    prefix = src.removeprefix("s3://datasets/")

    async def listed() -> dict[str, float]:
        async with dev.s3_client() as s3:
            page = await s3.list_objects_v2(Bucket="datasets", Prefix=prefix)
        found = {}
        for item in page["Contents"]:
            when = item["LastModified"]
            assert isinstance(when, datetime)
            found[item["Key"].removeprefix(prefix)] = when.timestamp()
        return found

    return asyncio.run(listed())


JOB = """#!/bin/bash
#HPCSTAGE --stage-in={src}:in:{filter}
eval "$(hpcstage env)"
cd "$HPCSTAGE_DIR/in" && find . -type f | sort | xargs sha256sum
find . -type f -printf 'MTIME %T@ %P\\n'
"""


def _mtimes(output: str) -> dict[str, float]:
    found = {}
    for line in output.splitlines():
        if line.startswith("MTIME "):
            _, when, rel = line.split(" ", 2)
            found[rel] = float(when)
    return found


def test_a_job_gets_only_what_its_filters_take_with_the_store_s_mtimes(stager: Stager) -> None:
    src, sums = _dataset(stager)
    job = stager.submit("alice", JOB.format(src=src, filter=FILTER), "--account=chem")
    assert stager.dev.wait_job(job, timeout=180) == "COMPLETED", stager.output("alice", job)
    out = stager.output("alice", job)
    assert parse_sums(out) == sums, out  # exactly the taken files, byte-exact
    doc = stager.wait_doc(job, "seen running by the daemon", lambda d: bool(d["nodes"]))
    # Never fetched, not just hidden: the agent counted one GET per taken object.
    assert fetched_on(doc, doc["nodes"][0]) == len(TAKEN), doc
    # The stored source names its filter (what `hpcstage status` shows).
    assert doc["requests"][0]["src"] == f"{src}?include=**/*.nc&exclude=tmp/**", doc
    listed = _last_modified(stager.dev, src)
    got = _mtimes(out)
    assert set(got) == set(TAKEN), out
    for rel in TAKEN:
        assert abs(got[rel] - listed[rel]) < 0.001, (rel, got[rel], listed[rel])


def test_a_bad_glob_refuses_the_job_naming_the_directive(stager: Stager) -> None:
    src, _ = _dataset(stager)
    script = JOB.format(src=src, filter="include=data[12.nc") + "echo RAN\n"
    job = stager.submit("bob", script, "--account=bio")
    assert stager.dev.wait_job(job, timeout=180) == "FAILED"
    out = stager.output("bob", job)
    assert "RAN" not in out
    assert "include='data[12.nc'" in out and "no closing ']'" in out, out
    assert f"--stage-in={src}:in:include=data[12.nc" in out, out
    status = stager.cli("bob", "status", str(job)).stdout
    assert "no closing ']'" in status, status


def _cached(stager: Stager, node: str, src: str) -> set[str]:
    """The keys under SRC (relative) that NODE's cache index holds (read-only, as root)."""
    prefix = src.removeprefix("s3://datasets/")
    index = Path(stager.dev.info.base) / "nodes" / node / "cache" / "index.db"
    with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT key FROM objects WHERE bucket = 'datasets' AND substr(key, 1, ?) = ?",
            (len(prefix), prefix),
        ).fetchall()
    return {key.removeprefix(prefix) for (key,) in rows}


def _warm(stager: Stager, src: str, node: str) -> dict[str, object]:
    done = stager.cli("alice", "warmup", src, "--nodes", node, "--json")
    doc: dict[str, object] = json.loads(done.stdout)
    return doc


def test_warmup_and_peer_copy_take_only_what_the_filters_take(stager: Stager) -> None:
    src, _ = _dataset(stager)
    filtered = f"{src}::{FILTER}"
    _warm(stager, filtered, "n1")
    assert _cached(stager, "n1", src) == set(TAKEN)  # a filtered warmup fetched only those
    _warm(stager, src, "n1")  # now n1 holds every object of the prefix
    assert _cached(stager, "n1", src) == {*TAKEN, *LEFT}

    doc = _warm(stager, filtered, "n2")  # n1 staged this filtered source: a peer of n2

    # n2 holds the taken objects only: peer copy offered n1's others to nobody.
    assert _cached(stager, "n2", src) == set(TAKEN)
    requests = doc["requests"]
    assert isinstance(requests, list)
    state = requests[0]["nodes"]["n2"]
    assert (state["peer_files"], state["fetched_files"]) == (len(TAKEN), 0), doc


def test_a_bad_glob_in_a_warmup_is_refused_by_name(stager: Stager) -> None:
    src, _ = _dataset(stager)
    refused = stager.cli(
        "alice", "warmup", f"{src}::exclude=a**", "--nodes", "n1", "--json", check=False
    )
    assert refused.returncode == 1
    assert "exclude='a**'" in refused.stderr and "whole path component" in refused.stderr
