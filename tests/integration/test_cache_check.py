"""`hpcstage warmup --check` and `hpcstage cache evict SRC` on the real dev cluster: how much
of a dataset each node's cache holds, evicting it, and what a job holds staying put."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from devcluster.cluster import DevCluster

from .staging import CHECKSUM_JOB, Stager, make_dataset, parse_sums, running_stager, small_files

pytestmark = pytest.mark.integration

# alice may read every dataset; bob only his own prefix (and admins anything).
POLICY = """default = "deny"

[[policy.rules]]
users = ["alice"]
read = ["s3://datasets/"]

[[policy.rules]]
users = ["bob"]
read = ["s3://datasets/bob/"]
"""


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    # The tests ask more than limits.cache_requests_per_minute's default (10) checks a minute.
    no_rate = "[limits]\ncache_requests_per_minute = 0\n"
    yield from running_stager(cluster, "cachecheck", policy=POLICY, extra=no_rate)


def _check(stager: Stager, user: str, src: str, nodes: str, *more: str) -> dict[str, Any]:
    done = stager.cli(user, "warmup", "--check", src, "--nodes", nodes, "--json", *more)
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def _evict(stager: Stager, user: str, src: str, *more: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        stager.cli(user, "cache", "evict", src, "--json", *more).stdout
    )
    return doc


def test_a_prefix_warmed_on_one_node_is_all_there_and_nowhere_else(stager: Stager) -> None:
    src, _ = make_dataset(stager.dev, small_files(24, size=4096))
    stager.cli("alice", "warmup", src, "--nodes", "n1", "--json")

    doc = _check(stager, "alice", src, "n[1-2]")

    assert (doc["objects"], doc["bytes"]) == (24, 24 * 4096)
    assert doc["nodes"]["n1"] == {"objects": 24, "bytes": 24 * 4096, "percent": 100.0}
    assert doc["nodes"]["n2"] == {"objects": 0, "bytes": 0, "percent": 0.0}
    assert doc["total"] == {"objects": 24, "bytes": 24 * 4096, "percent": 50.0}
    table = stager.cli("alice", "warmup", "--check", src, "--nodes", "n[1-2]").stdout
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
    assert lines == {
        "n1": ["24/24", "96.0KiB/96.0KiB", "100.0%"],
        "n2": ["0/24", "0B/96.0KiB", "0.0%"],
        "total": ["24/48", "96.0KiB/192.0KiB", "50.0%"],
    }
    # Partly warm is no error; --complete makes it one a script can test (status 2).
    partial = stager.cli(
        "alice", "warmup", "--check", src, "--nodes", "n[1-2]", "--complete", check=False
    )
    assert partial.returncode == 2, partial.stderr
    assert (
        stager.cli("alice", "warmup", "--check", src, "--nodes", "n1", "--complete").returncode == 0
    )


def test_a_changed_object_counts_as_missing_and_a_partial_eviction_shows(stager: Stager) -> None:
    files = {**small_files(10, size=1024, prefix="a/"), **small_files(6, size=2048, prefix="b/")}
    src, _ = make_dataset(stager.dev, files)
    stager.cli("alice", "warmup", src, "--nodes", "n2", "--json")

    evicted = _evict(stager, "alice", src + "a/", "--nodes", "n2")

    assert evicted["nodes"]["n2"] == {
        "evicted": 10,
        "evicted_bytes": 10 * 1024,
        "in_use": 0,
        "in_use_bytes": 0,
    }
    doc = _check(stager, "alice", src, "n2")
    assert doc["nodes"]["n2"] == {"objects": 6, "bytes": 6 * 2048, "percent": 54.5}
    # The store's object changes: the cached bytes are another version, not SRC as it is now.
    make_dataset(stager.dev, {"b/f00000.dat": b"changed"}, under=src.split("/")[3])
    doc = _check(stager, "alice", src, "n2")
    assert doc["nodes"]["n2"]["objects"] == 5
    # Evicting the prefix takes the old version too: nothing of it stays cached.
    assert _evict(stager, "alice", src, "--nodes", "n2")["total"]["evicted"] == 6
    assert _check(stager, "alice", src, "n2")["nodes"]["n2"]["objects"] == 0


JOB = CHECKSUM_JOB.replace('eval "$(hpcstage env)"\n', 'eval "$(hpcstage env)"\nsleep 25\n')


def test_evicting_what_a_running_job_holds_keeps_it_and_says_so(stager: Stager) -> None:
    src, sums = make_dataset(stager.dev, small_files(12, size=2048))
    dest = src.rstrip("/").rsplit("/", 1)[1]
    job = stager.submit("alice", JOB.format(src=src, dest=dest), "--nodelist=n3", "--time=2")
    stager.wait_doc(
        job,
        "its inputs ready on n3 while it runs",
        lambda d: d["staging"].get("n3") == "ready" and d["state"] == "RUNNING",
        timeout=180,
    )

    done = stager.cli("alice", "cache", "evict", src, "--nodes", "n3")

    assert "12 objects stay: jobs on those nodes use them" in done.stdout
    row = done.stdout.splitlines()[1].split()
    assert row == ["n3", "0", "0B", "12", "24.0KiB"], done.stdout
    assert _check(stager, "alice", src, "n3")["nodes"]["n3"]["percent"] == 100.0
    assert stager.dev.wait_job(job, timeout=180) == "COMPLETED", stager.output("alice", job)
    assert parse_sums(stager.output("alice", job)) == sums  # the job read every file


def test_a_user_who_may_not_read_src_is_refused_and_evicts_nothing(stager: Stager) -> None:
    src, _ = make_dataset(stager.dev, small_files(4, size=512))
    stager.cli("alice", "warmup", src, "--nodes", "n1", "--json")
    refusals: list[subprocess.CompletedProcess[str]] = [
        stager.cli("bob", "warmup", "--check", src, "--nodes", "n1", check=False),
        stager.cli("bob", "cache", "evict", src, "--nodes", "n1", check=False),
        stager.cli("bob", "cache", "evict", src, check=False),
    ]
    for refused in refusals:
        assert refused.returncode == 1, refused.stdout
        assert f"no policy rule grants user bob read access to {src}" in refused.stderr
    assert _check(stager, "alice", src, "n1")["nodes"]["n1"]["percent"] == 100.0
    # An admin may evict anything (the test runs as root).
    done = stager.client.post("/api/v1/cache/evict", {"src": src, "nodes": ["n1"]})
    assert done["nodes"]["n1"]["evicted"] == 4


def test_sources_other_than_s3_objects_and_prefixes_are_refused_by_name(stager: Stager) -> None:
    refused = stager.cli("alice", "warmup", "--check", "/etc/", "--nodes", "n1", check=False)
    assert refused.returncode == 1
    assert "covers s3://bucket/key and s3://bucket/prefix/ sources, not /etc/" in refused.stderr
    missing = stager.cli(
        "alice", "warmup", "--check", "s3://datasets/never-uploaded/", "--nodes", "n1", check=False
    )
    assert missing.returncode == 1
    assert "no objects under s3://datasets/never-uploaded/" in missing.stderr
